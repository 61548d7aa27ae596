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
        let Some(c) = g.as_mut() else {
            return Err(tr("no connection".into()));
        };
        match tokio::time::timeout(t, c.call(method, params)).await {
            Ok(Ok(Ok(v))) => Ok(v),
            Ok(Ok(Err(e))) => Err(DpError::Rpc {
                method: method.to_string(),
                code: e.code,
                message: e.message,
            }),
            Ok(Err(e)) => {
                *g = None;
                Err(tr(e.to_string()))
            }
            Err(_) => {
                // The answer may still come; a fresh connection keeps replies in order.
                *g = None;
                Err(tr(format!("no answer within {t:?}")))
            }
        }
    }
}
