//! JSON-RPC 2.0 over a Unix stream socket, as SPDK serves it: requests are JSON
//! objects one after another with no framing; responses likewise. Each client
//! connection is its own task and handles its requests in order; clients never
//! wait for each other.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tracing::{debug, info, warn};

/// JSON-RPC error codes.
pub mod code {
    pub const PARSE_ERROR: i32 = -32700;
    pub const INVALID_REQUEST: i32 = -32600;
    pub const METHOD_NOT_FOUND: i32 = -32601;
    pub const INVALID_PARAMS: i32 = -32602;
    pub const INTERNAL_ERROR: i32 = -32603;
}

/// The largest request accepted; a client that sends more without completing a
/// JSON value gets a parse error and is disconnected.
pub const MAX_REQUEST: usize = 16 << 20;

/// An error answered to the client: a negative errno (SPDK style) or a JSON-RPC code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{message} ({code})")]
pub struct RpcError {
    pub code: i32,
    pub message: String,
}

impl RpcError {
    pub fn new(code: i32, message: impl Into<String>) -> Self {
        RpcError {
            code,
            message: message.into(),
        }
    }
    /// `-errno` with the C library's text for it, as `spdk_strerror` gives.
    pub fn errno(errno: i32) -> Self {
        RpcError {
            code: -errno,
            message: strerror(errno),
        }
    }
    /// `-errno` with a message of our own.
    pub fn errno_msg(errno: i32, message: impl Into<String>) -> Self {
        RpcError {
            code: -errno,
            message: message.into(),
        }
    }
    pub fn invalid_params(why: impl std::fmt::Display) -> Self {
        RpcError::new(code::INVALID_PARAMS, format!("Invalid parameters: {why}"))
    }
}

/// The C library's message for an errno (what SPDK's spdk_strerror returns).
pub fn strerror(errno: i32) -> String {
    let s = std::io::Error::from_raw_os_error(errno).to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// What handles requests: the dataplane's method table.
pub trait Handler: Send + Sync + 'static {
    /// Handles one call. `params` is `Value::Null` when absent.
    fn call(
        &self,
        method: String,
        params: Value,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Value, RpcError>> + Send>>;
}

/// A listening RPC server.
pub struct RpcServer {
    path: PathBuf,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for RpcServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcServer")
            .field("path", &self.path)
            .finish()
    }
}

impl RpcServer {
    /// Binds `path` (mode 0600; a stale socket file left by a dead process is
    /// replaced) and serves `handler` until stopped.
    pub async fn start(path: &Path, handler: Arc<dyn Handler>) -> std::io::Result<RpcServer> {
        if path.exists() {
            // Only replace a socket nobody answers on: a live daemon keeps it.
            if UnixStream::connect(path).await.is_ok() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    format!("{} is in use by a running process", path.display()),
                ));
            }
            std::fs::remove_file(path)?;
        }
        // Create the socket with a restrictive umask-independent mode.
        let listener = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        let (stop, stop_rx) = watch::channel(false);
        info!(path = %path.display(), "JSON-RPC listening");
        let task = tokio::spawn(accept_loop(listener, handler, stop_rx));
        Ok(RpcServer {
            path: path.to_path_buf(),
            stop,
            task,
        })
    }

    /// Stops accepting and closes client connections after their current request.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn accept_loop(
    listener: UnixListener,
    handler: Arc<dyn Handler>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => {
                    let h = handler.clone();
                    let stop = stop.clone();
                    tokio::spawn(async move { serve_client(s, h, stop).await });
                }
                Err(e) => {
                    warn!("RPC accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            _ = stop.changed() => break,
        }
    }
}

/// Outcome of looking for the next complete JSON value in a buffer.
#[derive(Debug, PartialEq)]
pub enum Next {
    /// A value and the bytes it used (leading whitespace included).
    Value(Value, usize),
    /// No complete value yet.
    Incomplete,
    /// The bytes are not JSON; the stream cannot be resynchronised.
    Invalid(String),
}

/// Finds the next JSON value in `buf` (values are concatenated without framing).
pub fn next_value(buf: &[u8]) -> Next {
    let mut it = serde_json::Deserializer::from_slice(buf).into_iter::<Value>();
    match it.next() {
        None => Next::Incomplete,
        Some(Ok(v)) => Next::Value(v, it.byte_offset()),
        Some(Err(e)) if e.is_eof() => Next::Incomplete,
        Some(Err(e)) => Next::Invalid(e.to_string()),
    }
}

async fn serve_client(
    mut s: UnixStream,
    handler: Arc<dyn Handler>,
    mut stop: watch::Receiver<bool>,
) {
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        // Handle every complete request already buffered, in order.
        loop {
            match next_value(&buf) {
                Next::Value(v, used) => {
                    buf.drain(..used);
                    if let Some(resp) = handle(&*handler, v).await {
                        if write_json(&mut s, &resp).await.is_err() {
                            return;
                        }
                    }
                }
                Next::Incomplete => break,
                Next::Invalid(why) => {
                    debug!("RPC parse error: {why}");
                    let resp = error_response(
                        Value::Null,
                        &RpcError::new(code::PARSE_ERROR, format!("Parse error: {why}")),
                    );
                    let _ = write_json(&mut s, &resp).await;
                    return;
                }
            }
        }
        if buf.iter().all(|b| b.is_ascii_whitespace()) {
            buf.clear();
        }
        if buf.len() > MAX_REQUEST {
            let resp = error_response(
                Value::Null,
                &RpcError::new(
                    code::PARSE_ERROR,
                    format!("Parse error: request larger than {MAX_REQUEST} bytes"),
                ),
            );
            let _ = write_json(&mut s, &resp).await;
            return;
        }
        tokio::select! {
            r = s.read(&mut chunk) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            },
            _ = stop.changed() => return,
        }
    }
}

async fn write_json(s: &mut UnixStream, v: &Value) -> std::io::Result<()> {
    let mut out = serde_json::to_vec(v).unwrap_or_default();
    out.push(b'\n');
    s.write_all(&out).await
}

fn error_response(id: Value, e: &RpcError) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": e.code, "message": e.message}})
}

/// Handles one request value; None for notifications (no id), which get no answer.
pub async fn handle(handler: &dyn Handler, v: Value) -> Option<Value> {
    let Value::Object(mut m) = v else {
        return Some(error_response(
            Value::Null,
            &RpcError::new(code::INVALID_REQUEST, "Invalid request"),
        ));
    };
    let id = m.remove("id");
    let has_id = id.is_some();
    let id = id.unwrap_or(Value::Null);
    if !matches!(id, Value::Null | Value::Number(_) | Value::String(_)) {
        return Some(error_response(
            Value::Null,
            &RpcError::new(code::INVALID_REQUEST, "Invalid request: bad id"),
        ));
    }
    let method = match m.remove("method") {
        Some(Value::String(s)) => s,
        _ => {
            return Some(error_response(
                id,
                &RpcError::new(code::INVALID_REQUEST, "Invalid request: missing method"),
            ));
        }
    };
    if let Some(v) = m.get("jsonrpc") {
        if v != "2.0" {
            return Some(error_response(
                id,
                &RpcError::new(
                    code::INVALID_REQUEST,
                    "Invalid request: jsonrpc must be \"2.0\"",
                ),
            ));
        }
    }
    let params = m.remove("params").unwrap_or(Value::Null);
    if !matches!(params, Value::Null | Value::Object(_) | Value::Array(_)) {
        return Some(error_response(
            id,
            &RpcError::invalid_params("params must be an object"),
        ));
    }
    let t0 = std::time::Instant::now();
    let r = handler.call(method.clone(), params).await;
    match &r {
        Ok(_) => debug!(%method, us = t0.elapsed().as_micros() as u64, "RPC ok"),
        // "Does not exist" is the ordinary answer of a lookup by name.
        Err(e) if is_query(&method) => {
            debug!(%method, code = e.code, error = %e.message, "RPC failed")
        }
        Err(e) => info!(%method, code = e.code, error = %e.message, "RPC failed"),
    }
    if !has_id {
        return None;
    }
    Some(match r {
        Ok(result) => json!({"jsonrpc": "2.0", "id": id, "result": result}),
        Err(e) => error_response(id, &e),
    })
}

/// A small client for tools and tests: one connection, one call at a time.
#[derive(Debug)]
pub struct RpcClient {
    s: UnixStream,
    buf: Vec<u8>,
    next_id: u64,
}

impl RpcClient {
    pub async fn connect(path: &Path) -> std::io::Result<Self> {
        Ok(RpcClient {
            s: UnixStream::connect(path).await?,
            buf: Vec::new(),
            next_id: 1,
        })
    }

    /// Calls `method`; Ok(result) or Err(the server's error).
    pub async fn call(
        &mut self,
        method: &str,
        params: Value,
    ) -> std::io::Result<Result<Value, RpcError>> {
        let id = self.next_id;
        self.next_id += 1;
        let mut req = json!({"jsonrpc": "2.0", "method": method, "id": id});
        if !params.is_null() {
            req["params"] = params;
        }
        let mut out = serde_json::to_vec(&req).map_err(std::io::Error::other)?;
        out.push(b'\n');
        self.s.write_all(&out).await?;
        // A reply with an older id answers a call whose caller went away
        // before reading it (its future was dropped): skipped, so that no
        // caller ever gets another call's answer.
        let v = loop {
            let v = self.read_value().await?;
            match v.get("id").and_then(Value::as_u64) {
                Some(got) if got == id => break v,
                Some(got) if got < id => continue,
                got => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("reply to {method} (id {id}) carries id {got:?}"),
                    ))
                }
            }
        };
        if let Some(e) = v.get("error") {
            let code = e.get("code").and_then(Value::as_i64).unwrap_or(0) as i32;
            let message = e
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            return Ok(Err(RpcError { code, message }));
        }
        Ok(Ok(v.get("result").cloned().unwrap_or(Value::Null)))
    }

    /// Reads the next JSON value the server sends.
    pub async fn read_value(&mut self) -> std::io::Result<Value> {
        let mut chunk = [0u8; 8192];
        loop {
            match next_value(&self.buf) {
                Next::Value(v, used) => {
                    self.buf.drain(..used);
                    return Ok(v);
                }
                Next::Invalid(why) => {
                    return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, why))
                }
                Next::Incomplete => {}
            }
            let n = self.s.read(&mut chunk).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Sends raw bytes (tests of malformed input).
    pub async fn send_raw(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.s.write_all(b).await
    }
}

/// Methods that only read (`*_get_*`, `*_list`): their failures are answers
/// to a question, not events worth an info line.
fn is_query(method: &str) -> bool {
    method.contains("_get_") || method.starts_with("get_") || method.ends_with("_list")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_concatenated_values() {
        let b = br#"{"a":1} {"b":[2,3]}{"c"#;
        let Next::Value(v, used) = next_value(b) else {
            panic!()
        };
        assert_eq!(v, json!({"a": 1}));
        let Next::Value(v2, used2) = next_value(&b[used..]) else {
            panic!()
        };
        assert_eq!(v2, json!({"b": [2, 3]}));
        assert_eq!(next_value(&b[used + used2..]), Next::Incomplete);
        assert!(matches!(next_value(b"{\"a\":}"), Next::Invalid(_)));
        assert_eq!(next_value(b"   "), Next::Incomplete);
    }

    #[test]
    fn strerror_is_the_c_text() {
        assert_eq!(strerror(libc::ENODEV), "No such device");
        assert_eq!(strerror(libc::EEXIST), "File exists");
        assert_eq!(RpcError::errno(libc::EALREADY).code, -114);
    }
}
