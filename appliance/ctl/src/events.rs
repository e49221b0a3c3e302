//! `appliancectl events ...`

use std::io::Write;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use appliance_types::control::{Request, Response};
use appliance_types::events::{EventMessage, EventsRequest, EventsResponse};
use clap::{Args, Subcommand};

use crate::{print_json, Client};

#[derive(Debug, Subcommand)]
pub(crate) enum EventsCmd {
    /// Publish one message (needs admin rights).
    Publish {
        /// Subject, e.g. `system.note` (no wildcards).
        subject: String,
        /// Payload, as JSON. Default: `{}`.
        #[arg(long, value_name = "JSON")]
        data: Option<String>,
    },
    /// Follow live messages until interrupted. With --json, one JSON
    /// document per message, one per line.
    Tail {
        /// Subject pattern: `*` matches one token, a final `>` the rest.
        pattern: String,
    },
    /// Print stored messages of durable subjects.
    Replay(ReplayArgs),
    /// Dead letters: messages an in-process handler failed to take.
    #[command(subcommand)]
    Dlq(DlqCmd),
}

#[derive(Debug, Args)]
pub(crate) struct ReplayArgs {
    /// Subject pattern.
    pattern: String,
    /// Start at this sequence number.
    #[arg(long, value_name = "N", conflicts_with = "since")]
    from_seq: Option<u64>,
    /// Start at this time: an RFC 3339 timestamp (`2026-11-22T20:00:00Z`) or
    /// an age (`15m`, `2h`, `3days`).
    #[arg(long, value_name = "TIME")]
    since: Option<String>,
    /// At most this many messages.
    #[arg(long, value_name = "K", default_value_t = 1000)]
    limit: u32,
}

#[derive(Debug, Subcommand)]
pub(crate) enum DlqCmd {
    /// List the dead letters.
    List,
    /// Hand one dead letter to its handler again (needs admin rights).
    Retry {
        /// Entry id, from `events dlq list`.
        id: u64,
    },
}

/// Parses `--since`: an RFC 3339 time or an age before now, to unix ms.
pub(crate) fn parse_since(text: &str, now: SystemTime) -> anyhow::Result<u64> {
    let at = match humantime::parse_rfc3339_weak(text) {
        Ok(t) => t,
        Err(_) => {
            let age = humantime::parse_duration(text).with_context(|| {
                format!("--since {text:?} is neither an RFC 3339 time nor an age like 15m or 2h")
            })?;
            now.checked_sub(age)
                .with_context(|| format!("--since {text:?} reaches before 1970"))?
        }
    };
    let ms = at
        .duration_since(UNIX_EPOCH)
        .with_context(|| format!("--since {text:?} is before 1970"))?
        .as_millis();
    u64::try_from(ms).context("--since is too far in the future")
}

/// The payload as JSON if it is JSON, else as a string.
fn payload_value(m: &EventMessage) -> serde_json::Value {
    serde_json::from_slice(&m.payload).unwrap_or_else(|_| {
        serde_json::Value::String(String::from_utf8_lossy(&m.payload).into_owned())
    })
}

fn message_json(m: &EventMessage) -> serde_json::Value {
    let mut v = serde_json::json!({
        "subject": m.subject,
        "seq": m.seq,
        "ts_ms": m.ts_ms,
        "time": humantime::format_rfc3339_millis(UNIX_EPOCH + std::time::Duration::from_millis(m.ts_ms)).to_string(),
        "data": payload_value(m),
    });
    if !m.headers.is_empty() {
        v["headers"] = serde_json::json!(m.headers);
    }
    if m.payload_len > m.payload.len() as u64 {
        v["truncated_from"] = serde_json::json!(m.payload_len);
    }
    v
}

fn message_line(m: &EventMessage) -> String {
    let time =
        humantime::format_rfc3339_millis(UNIX_EPOCH + std::time::Duration::from_millis(m.ts_ms));
    let seq = m.seq.map_or_else(|| "-".to_owned(), |s| s.to_string());
    let mut payload = String::from_utf8_lossy(&m.payload).into_owned();
    if m.payload_len > m.payload.len() as u64 {
        payload.push_str(&format!(" ... ({} bytes in all)", m.payload_len));
    }
    format!("{time} #{seq} {} {payload}", m.subject)
}

pub(crate) fn run(client: &mut Client, cmd: &EventsCmd, json: bool) -> anyhow::Result<ExitCode> {
    match cmd {
        EventsCmd::Publish { subject, data } => {
            let text = data.as_deref().unwrap_or("{}");
            let value: serde_json::Value = serde_json::from_str(text)
                .with_context(|| format!("--data is not valid JSON: {text}"))?;
            let payload = serde_json::to_vec(&value)?;
            let req = Request::Events(EventsRequest::Publish {
                subject: subject.clone(),
                payload,
            });
            match client.request(&req)? {
                Response::Events(EventsResponse::Published { seq }) => {
                    if json {
                        print_json(&serde_json::json!({ "subject": subject, "seq": seq }))?;
                    } else {
                        match seq {
                            Some(s) => println!("published {subject} (stored as #{s})"),
                            None => println!("published {subject}"),
                        }
                    }
                    Ok(ExitCode::SUCCESS)
                }
                other => bail!("unexpected answer from applianced: {other:?}"),
            }
        }
        EventsCmd::Tail { pattern } => {
            client.no_read_timeout()?;
            client.send(&Request::Events(EventsRequest::Tail {
                pattern: pattern.clone(),
            }))?;
            let mut out = std::io::stdout().lock();
            loop {
                match client.next_response()? {
                    Response::Events(EventsResponse::Message(m)) => {
                        let line = if json {
                            message_json(&m).to_string()
                        } else {
                            message_line(&m)
                        };
                        if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
                            // Our reader went away (a closed pipe): stop quietly.
                            return Ok(ExitCode::SUCCESS);
                        }
                    }
                    Response::Events(EventsResponse::End { count, reason }) => {
                        eprintln!("appliancectl: tail ended after {count} messages: {reason}");
                        return Ok(ExitCode::FAILURE);
                    }
                    other => bail!("unexpected answer from applianced: {other:?}"),
                }
            }
        }
        EventsCmd::Replay(a) => {
            let since_ms = a
                .since
                .as_deref()
                .map(|s| parse_since(s, SystemTime::now()))
                .transpose()?;
            client.send(&Request::Events(EventsRequest::Replay {
                pattern: a.pattern.clone(),
                from_seq: a.from_seq,
                since_ms,
                limit: a.limit,
            }))?;
            let mut all = Vec::new();
            loop {
                match client.next_response()? {
                    Response::Events(EventsResponse::Message(m)) => {
                        if json {
                            all.push(message_json(&m));
                        } else {
                            println!("{}", message_line(&m));
                        }
                    }
                    Response::Events(EventsResponse::End { count, .. }) => {
                        if json {
                            print_json(&all)?;
                        } else if count == 0 {
                            eprintln!("no stored messages match");
                        }
                        return Ok(ExitCode::SUCCESS);
                    }
                    other => bail!("unexpected answer from applianced: {other:?}"),
                }
            }
        }
        EventsCmd::Dlq(DlqCmd::List) => {
            match client.request(&Request::Events(EventsRequest::DlqList))? {
                Response::Events(EventsResponse::DeadLetters(list)) => {
                    if json {
                        print_json(&list)?;
                    } else if list.is_empty() {
                        println!("no dead letters");
                    } else {
                        for d in &list {
                            println!(
                                "#{:<6} {:<24} handler={} attempts={} {} bytes: {}",
                                d.id, d.subject, d.handler, d.attempts, d.payload_bytes, d.error
                            );
                        }
                    }
                    Ok(ExitCode::SUCCESS)
                }
                other => bail!("unexpected answer from applianced: {other:?}"),
            }
        }
        EventsCmd::Dlq(DlqCmd::Retry { id }) => {
            match client.request(&Request::Events(EventsRequest::DlqRetry { id: *id }))? {
                Response::Events(EventsResponse::Retried { delivered, error }) => {
                    if json {
                        print_json(
                            &serde_json::json!({ "id": id, "delivered": delivered, "error": error }),
                        )?;
                    } else if delivered {
                        println!("dead letter #{id} delivered");
                    } else {
                        println!("dead letter #{id} failed again: {error}");
                    }
                    Ok(if delivered {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    })
                }
                other => bail!("unexpected answer from applianced: {other:?}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn since_accepts_times_and_ages() {
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        assert_eq!(
            parse_since("15m", now).unwrap(),
            (1_800_000_000 - 900) * 1000
        );
        assert_eq!(
            parse_since("2h", now).unwrap(),
            (1_800_000_000 - 7200) * 1000
        );
        assert_eq!(parse_since("1970-01-01T00:00:10Z", now).unwrap(), 10_000);
        assert!(parse_since("yesterday-ish", now).is_err());
        assert!(parse_since("99999999days", now).is_err());
    }
}
