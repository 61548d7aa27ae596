//! The CLI's client of the manager's HTTP API, and the CLI's errors with the exit
//! codes scripts can rely on:
//!
//! | code | meaning |
//! |---|---|
//! | 0 | done |
//! | 1 | usage error, or the operation failed (e.g. the volume went faulted) |
//! | 2 | the manager refused the request (HTTP 4xx): its error and advice are printed |
//! | 3 | the manager cannot be reached |
//! | 4 | timed out waiting |

use std::process::ExitCode;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::Value;

/// Where the manager is, and how to print: options every CLI command takes.
#[derive(Debug, Clone, clap::Args)]
pub struct GlobalOpts {
    /// The manager's API [default: http://127.0.0.1:9500]. `corral agent`
    /// registers with it when given.
    #[arg(long, global = true, env = "CORRAL_MANAGER")]
    pub manager: Option<String>,
    /// Output: human tables, or JSON for scripts.
    #[arg(
        short = 'o',
        long = "output",
        global = true,
        value_enum,
        default_value = "table"
    )]
    pub output: OutputFormat,
}

/// The manager's API when neither --manager nor CORRAL_MANAGER says.
pub const DEFAULT_MANAGER: &str = "http://127.0.0.1:9500";

impl GlobalOpts {
    pub fn manager_url(&self) -> &str {
        self.manager.as_deref().unwrap_or(DEFAULT_MANAGER)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    Table,
    Json,
}

/// Exit code: the manager refused (4xx).
pub const EXIT_REFUSED: u8 = 2;
/// Exit code: the manager cannot be reached.
pub const EXIT_UNREACHABLE: u8 = 3;
/// Exit code: timed out waiting.
pub const EXIT_TIMEOUT: u8 = 4;

/// A CLI failure: what failed, why, what to do, and the exit code it maps to.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad input that clap could not catch (a size, a duration).
    #[error("{0}")]
    Usage(String),
    /// The manager answered 4xx.
    #[error("{what}: {message}")]
    Refused {
        what: String,
        status: u16,
        message: String,
        advice: Option<String>,
    },
    /// The manager answered 5xx (its own trouble, or a transient one).
    #[error("{what}: {message} (HTTP {status})")]
    Server {
        what: String,
        status: u16,
        message: String,
        advice: Option<String>,
    },
    #[error("{what}: cannot reach the manager at {url}: {reason}")]
    Unreachable {
        what: String,
        url: String,
        reason: String,
    },
    #[error("{what}: timed out after {after:?}: {detail}")]
    Timeout {
        what: String,
        after: Duration,
        detail: String,
        advice: Option<String>,
    },
    /// The operation was carried out but ended badly (e.g. the volume faulted).
    #[error("{what}: {message}")]
    Failed {
        what: String,
        message: String,
        advice: Option<String>,
    },
}

impl CliError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) | CliError::Server { .. } | CliError::Failed { .. } => 1,
            CliError::Refused { .. } => EXIT_REFUSED,
            CliError::Unreachable { .. } => EXIT_UNREACHABLE,
            CliError::Timeout { .. } => EXIT_TIMEOUT,
        }
    }

    pub fn advice(&self) -> Option<String> {
        match self {
            CliError::Usage(_) => Some("see `corral --help`".into()),
            CliError::Refused { advice, .. }
            | CliError::Server { advice, .. }
            | CliError::Timeout { advice, .. }
            | CliError::Failed { advice, .. } => advice.clone(),
            CliError::Unreachable { url, .. } => Some(format!(
                "is the manager running? Start everything on this machine with \
                 `corral up --data-dir ./data`, or point --manager / CORRAL_MANAGER at it \
                 (now {url})"
            )),
        }
    }

    /// Prints the error and its advice on stderr; returns the exit code.
    pub fn report(&self) -> ExitCode {
        eprintln!("corral: error: {self}");
        if let Some(a) = self.advice() {
            eprintln!("  what to do: {a}");
        }
        ExitCode::from(self.exit_code())
    }
}

/// Percent-encodes one path segment, so that any name reaches the manager intact
/// (and is refused there with a reason if it is not a valid name).
pub fn seg(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            o.push(b as char);
        } else {
            o.push_str(&format!("%{b:02X}"));
        }
    }
    o
}

/// A client of the manager's API. Every call names what it was doing (`what`)
/// so the error says what failed, on which object.
#[derive(Debug, Clone)]
pub struct Client {
    pub base: String,
    http: reqwest::Client,
}

/// Bound of one API call (snapshots touch every replica, so not too short).
const CALL_TIMEOUT: Duration = Duration::from_secs(90);

impl Client {
    pub fn new(base: &str) -> Result<Self, CliError> {
        let base = base.trim_end_matches('/').to_string();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(CliError::Usage(format!(
                "--manager {base}: expected a URL like http://127.0.0.1:9500"
            )));
        }
        let mut b = reqwest::Client::builder().connect_timeout(Duration::from_secs(3));
        if is_loopback_url(&base) {
            // An http_proxy meant for the outside must not swallow local calls.
            b = b.no_proxy();
        }
        let http = b
            .build()
            .map_err(|e| CliError::Usage(format!("HTTP client: {e}")))?;
        Ok(Client { base, http })
    }

    fn transport(&self, what: &str, e: reqwest::Error, t: Duration) -> CliError {
        if e.is_timeout() && !e.is_connect() {
            return CliError::Timeout {
                what: what.into(),
                after: t,
                detail: "the manager did not answer".into(),
                advice: Some("the manager may be overloaded; see its log".into()),
            };
        }
        // reqwest's Display hides the cause: the innermost error says it
        // ("Connection refused (os error 111)").
        let mut reason = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            reason = s.to_string();
            src = s.source();
        }
        CliError::Unreachable {
            what: what.into(),
            url: self.base.clone(),
            reason,
        }
    }

    /// Sends a request; returns the JSON answer, or the manager's error.
    pub async fn call(
        &self,
        what: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, CliError> {
        let url = format!("{}{path}", self.base);
        let mut rq = self.http.request(method, &url).timeout(CALL_TIMEOUT);
        if let Some(b) = body {
            rq = rq.json(b);
        }
        let resp = rq
            .send()
            .await
            .map_err(|e| self.transport(what, e, CALL_TIMEOUT))?;
        let status = resp.status();
        let text = resp
            .text()
            .await
            .map_err(|e| self.transport(what, e, CALL_TIMEOUT))?;
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        if status.is_success() {
            return Ok(v);
        }
        let message = v["error"].as_str().map(str::to_string).unwrap_or_else(|| {
            let t = text.trim();
            if t.is_empty() {
                status.to_string()
            } else {
                t.chars().take(300).collect()
            }
        });
        let advice = v["advice"].as_str().map(str::to_string);
        let code = status.as_u16();
        if status.is_client_error() {
            let advice = advice.or_else(|| default_advice(code, path));
            Err(CliError::Refused {
                what: what.into(),
                status: code,
                message,
                advice,
            })
        } else {
            let advice = advice.or_else(|| {
                (v["class"] == "transient")
                    .then(|| "this is transient: try again shortly".to_string())
            });
            Err(CliError::Server {
                what: what.into(),
                status: code,
                message,
                advice,
            })
        }
    }

    pub async fn get<T: DeserializeOwned>(&self, what: &str, path: &str) -> Result<T, CliError> {
        let v = self.call(what, reqwest::Method::GET, path, None).await?;
        decode(what, v)
    }

    pub async fn post(&self, what: &str, path: &str, body: &Value) -> Result<Value, CliError> {
        self.call(what, reqwest::Method::POST, path, Some(body))
            .await
    }

    pub async fn delete(&self, what: &str, path: &str) -> Result<Value, CliError> {
        self.call(what, reqwest::Method::DELETE, path, None).await
    }

    /// Opens a streaming GET (no overall timeout: the caller bounds each read).
    pub async fn stream(&self, what: &str, path: &str) -> Result<reqwest::Response, CliError> {
        let url = format!("{}{path}", self.base);
        let resp = self
            .http
            .get(&url)
            .send()
            .await
            .map_err(|e| self.transport(what, e, CALL_TIMEOUT))?;
        if !resp.status().is_success() {
            let code = resp.status().as_u16();
            let v: Value = resp.json().await.unwrap_or(Value::Null);
            return Err(CliError::Refused {
                what: what.into(),
                status: code,
                message: v["error"].as_str().unwrap_or("request refused").to_string(),
                advice: v["advice"].as_str().map(str::to_string),
            });
        }
        Ok(resp)
    }
}

/// Whether a URL's host is this machine (localhost, 127.0.0.0/8, ::1).
pub fn is_loopback_url(url: &str) -> bool {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let hostport = rest.split('/').next().unwrap_or("");
    let host = if let Some(h) = hostport.strip_prefix('[') {
        h.split(']').next().unwrap_or("")
    } else {
        hostport
            .rsplit_once(':')
            .map(|(h, _)| h)
            .unwrap_or(hostport)
    };
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Decodes an answer, or says which answer did not fit (a CLI/manager version skew).
pub fn decode<T: DeserializeOwned>(what: &str, v: Value) -> Result<T, CliError> {
    serde_json::from_value(v).map_err(|e| CliError::Failed {
        what: what.into(),
        message: format!("unexpected answer from the manager: {e}"),
        advice: Some("are the CLI and the manager the same corral version?".into()),
    })
}

/// Advice for a 4xx the manager sent without any: where to look.
fn default_advice(status: u16, path: &str) -> Option<String> {
    let kind = path
        .trim_start_matches("/v1/")
        .split('/')
        .next()
        .unwrap_or("");
    match status {
        404 => match kind {
            "volumes" if path.contains("/snapshots/") => {
                Some("list snapshots with `corral snapshot ls VOLUME`".into())
            }
            "volumes" => Some("list volumes with `corral volume ls`".into()),
            "nodes" => Some("list nodes with `corral node ls`".into()),
            _ => None,
        },
        409 if kind == "volumes" => {
            Some("see the volume's state with `corral volume show NAME`".into())
        }
        _ => None,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn segments_are_encoded() {
        assert_eq!(seg("vol-1_a.b"), "vol-1_a.b");
        assert_eq!(seg("a/b"), "a%2Fb");
        assert_eq!(seg("a b?"), "a%20b%3F");
    }

    #[test]
    fn exit_codes() {
        let r = CliError::Refused {
            what: "x".into(),
            status: 404,
            message: "m".into(),
            advice: None,
        };
        assert_eq!(r.exit_code(), 2);
        let u = CliError::Unreachable {
            what: "x".into(),
            url: "http://h".into(),
            reason: "refused".into(),
        };
        assert_eq!(u.exit_code(), 3);
        assert!(u.advice().unwrap().contains("corral up"));
        let t = CliError::Timeout {
            what: "x".into(),
            after: Duration::from_secs(1),
            detail: "d".into(),
            advice: None,
        };
        assert_eq!(t.exit_code(), 4);
        assert_eq!(CliError::Usage("u".into()).exit_code(), 1);
    }

    #[test]
    fn loopback_urls() {
        assert!(is_loopback_url("http://127.0.0.1:9500"));
        assert!(is_loopback_url("http://127.3.4.5:1/x"));
        assert!(is_loopback_url("http://localhost:9500/"));
        assert!(is_loopback_url("http://[::1]:9500"));
        assert!(!is_loopback_url("http://10.0.0.1:9500"));
        assert!(!is_loopback_url("http://manager.example:9500"));
    }

    #[test]
    fn advice_for_missing_objects() {
        assert!(default_advice(404, "/v1/volumes/x")
            .unwrap()
            .contains("volume ls"));
        assert!(default_advice(404, "/v1/volumes/x/snapshots/s")
            .unwrap()
            .contains("snapshot ls"));
        assert_eq!(default_advice(500, "/v1/volumes/x"), None);
        assert!(Client::new("localhost:9500").is_err());
        assert_eq!(Client::new("http://h:1/").unwrap().base, "http://h:1");
    }
}
