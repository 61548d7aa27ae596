//! The agent's client of its dataplane's JSON-RPC: one connection, reconnected
//! on failure, a timeout on every call, errors that name the method.

use std::path::PathBuf;
use std::time::Duration;

use dataplane::rpc::RpcClient;
use serde_json::Value;
use tokio::sync::Mutex;

use crate::retry::{classify_rpc_code, ErrorClass};

/// A failed dataplane call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DpError {
    #[error("dataplane {method}: error {code}: {message}")]
    Rpc {
        method: String,
        code: i32,
        message: String,
    },
    #[error("dataplane {method}: {reason}")]
    Transport { method: String, reason: String },
}

impl DpError {
    pub fn code(&self) -> Option<i32> {
        match self {
            DpError::Rpc { code, .. } => Some(*code),
            DpError::Transport { .. } => None,
        }
    }
    pub fn class(&self) -> ErrorClass {
        match self {
            DpError::Rpc { code, .. } => classify_rpc_code(*code),
            DpError::Transport { .. } => ErrorClass::Transient,
        }
    }
}

/// Default bound of one call (detach may wait 10 s inside the dataplane).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug)]
pub struct DpClient {
    path: PathBuf,
    conn: Mutex<Option<RpcClient>>,
}

impl DpClient {
    pub fn new(path: PathBuf) -> Self {
        DpClient {
            path,
            conn: Mutex::new(None),
        }
    }

    pub async fn call(&self, method: &str, params: Value) -> Result<Value, DpError> {
        self.call_timeout(method, params, CALL_TIMEOUT).await
    }

    pub async fn call_timeout(
        &self,
        method: &str,
        params: Value,
        t: Duration,
    ) -> Result<Value, DpError> {
        let mut g = self.conn.lock().await;
        let tr = |reason: String| DpError::Transport {
            method: method.to_string(),
            reason,
        };
        if g.is_none() {
            let c = tokio::time::timeout(Duration::from_secs(5), RpcClient::connect(&self.path))
                .await
                .map_err(|_| tr(format!("connect to {} timed out", self.path.display())))?
                .map_err(|e| tr(format!("connect to {}: {e}", self.path.display())))?;
            *g = Some(c);
        }
        // Taken out for the call and put back only when it ends: if this
        // future is dropped mid-call (an HTTP client of the agent went away),
        // the connection goes with it, and no later call can read this one's
        // answer.
        let Some(mut c) = g.take() else {
            return Err(tr("no connection".into()));
        };
        match tokio::time::timeout(t, c.call(method, params)).await {
            Ok(Ok(Ok(v))) => {
                *g = Some(c);
                Ok(v)
            }
            Ok(Ok(Err(e))) => {
                *g = Some(c);
                Err(DpError::Rpc {
                    method: method.to_string(),
                    code: e.code,
                    message: e.message,
                })
            }
            Ok(Err(e)) => Err(tr(e.to_string())),
            // The answer may still come; a fresh connection keeps replies in order.
            Err(_) => Err(tr(format!("no answer within {t:?}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    use tokio::net::UnixListener;

    /// A caller that goes away mid-call (its future dropped, as when the
    /// agent's HTTP client disconnects) must not leave its answer for the
    /// next caller: the next call gets its own.
    #[tokio::test]
    async fn a_dropped_call_never_answers_the_next_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dp.sock");
        let l = UnixListener::bind(&path).unwrap();
        // A dataplane that answers each request with its method name, the
        // first one only after a delay.
        tokio::spawn(async move {
            let mut first = true;
            loop {
                let Ok((s, _)) = l.accept().await else { return };
                let slow = std::mem::take(&mut first);
                tokio::spawn(async move {
                    let (r, mut w) = s.into_split();
                    let mut lines = BufReader::new(r).lines();
                    while let Ok(Some(line)) = lines.next_line().await {
                        let q: Value = serde_json::from_str(&line).unwrap();
                        if slow {
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        let a = json!({"jsonrpc": "2.0", "id": q["id"], "result": q["method"]});
                        let mut b = serde_json::to_vec(&a).unwrap();
                        b.push(b'\n');
                        if w.write_all(&b).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        let c = DpClient::new(path);
        let dropped = tokio::time::timeout(Duration::from_millis(50), c.call("first", Value::Null));
        assert!(dropped.await.is_err(), "the first call was cut short");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let v = c.call("second", Value::Null).await.unwrap();
        assert_eq!(v, json!("second"));
    }
}
