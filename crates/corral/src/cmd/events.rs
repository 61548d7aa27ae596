//! `corral events [--follow] [--since N]`: the manager's events, as a list or as
//! a live stream (NDJSON from `/v1/events?follow=true`) that survives a manager
//! restart by reconnecting from the last sequence number it printed.

use std::time::Duration;

use control::model::Event;
use control::retry::Backoff;
use serde_json::Value;

use super::client::{decode, CliError, Client};
use super::ctl::{event_line, print_json, EventsArgs};

/// The manager sends a newline every 15 s on an idle stream; three missed
/// means the manager (or the path to it) is gone.
const IDLE_LIMIT: Duration = Duration::from_secs(45);

pub async fn run(c: &Client, a: EventsArgs, json_out: bool) -> Result<(), CliError> {
    if !a.follow {
        let what = "list events";
        let v: Value = c
            .get(what, &format!("/v1/events?since={}", a.since))
            .await?;
        if json_out {
            print_json(&v);
            return Ok(());
        }
        let evs: Vec<Event> = decode(what, v)?;
        for e in &evs {
            println!("{}", event_line(e));
        }
        if evs.is_empty() {
            eprintln!("no events after #{}", a.since);
        }
        return Ok(());
    }
    let mut last = a.since;
    let mut connected_once = false;
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(10));
    loop {
        let path = format!("/v1/events?since={last}&follow=true");
        let mut resp = match c.stream("follow events", &path).await {
            Ok(r) => r,
            // The first connection decides the exit code: nothing to follow.
            Err(e) if !connected_once => return Err(e),
            Err(e) => {
                let d = backoff.next_delay();
                eprintln!("corral: events: {e}; reconnecting in {d:.1?}");
                tokio::time::sleep(d).await;
                continue;
            }
        };
        if connected_once {
            eprintln!("corral: events: reconnected; continuing after #{last}");
        }
        connected_once = true;
        backoff.reset();
        let mut buf: Vec<u8> = Vec::new();
        let why = loop {
            match tokio::time::timeout(IDLE_LIMIT, resp.chunk()).await {
                Ok(Ok(Some(bytes))) => {
                    buf.extend_from_slice(&bytes);
                    while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                        let line: Vec<u8> = buf.drain(..=pos).collect();
                        if let Some(e) = parse_line(&line) {
                            // A reconnect may replay what was already printed.
                            if e.seq <= last {
                                continue;
                            }
                            last = e.seq;
                            if json_out {
                                println!("{}", serde_json::to_string(&e).unwrap_or_default());
                            } else {
                                println!("{}", event_line(&e));
                            }
                        }
                    }
                }
                Ok(Ok(None)) => break "the manager closed the stream".to_string(),
                Ok(Err(e)) => break format!("stream broken: {e}"),
                Err(_) => break format!("nothing heard for {IDLE_LIMIT:?}"),
            }
        };
        eprintln!("corral: events: {why}; reconnecting");
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

/// One NDJSON line: an event, or None for the keep-alive blank lines.
fn parse_line(line: &[u8]) -> Option<Event> {
    let s = std::str::from_utf8(line).ok()?.trim();
    if s.is_empty() {
        return None;
    }
    serde_json::from_str(s).ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn lines() {
        assert!(parse_line(b"\n").is_none());
        assert!(parse_line(b"not json\n").is_none());
        let e = parse_line(
            br#"{"seq":3,"time":1,"kind":"volume","object":"v","reason":"Created","message":"m"}
"#,
        )
        .unwrap();
        assert_eq!(e.seq, 3);
        assert_eq!(e.reason, "Created");
    }
}
