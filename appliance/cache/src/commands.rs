//! The command layer: one decoded frame in, one reply out.
//!
//! No IO here beyond calling the [`Cache`]; the server feeds frames from the
//! decoder and writes the replies. Unknown commands, wrong arities and bad
//! arguments get a RESP error and the connection stays open.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;

use crate::cache::{
    Cache, CacheError, ExpireCondition, KeyTtl, SetCondition, SetExpiry, SetOptions,
};
use crate::persist::Fsync;
use crate::resp::{Frame, Protocol, Reply, DIRECT_BULK_MIN};

/// Server name reported by `HELLO` and `INFO`.
pub const SERVER_NAME: &str = "appliance-cache";
/// Redis version we claim compatibility with (clients gate features on it).
pub const COMPAT_VERSION: &str = "7.2.0";

/// Per-connection state.
#[derive(Debug, Clone, Default)]
pub struct Session {
    /// Connection id (`CLIENT ID`, `HELLO`).
    pub id: u64,
    /// Reply protocol.
    pub protocol: Protocol,
    /// `CLIENT SETNAME` name.
    pub name: Option<Bytes>,
    /// The RESP server's counters, for `INFO` (none in process).
    pub clients: Option<std::sync::Arc<ClientStats>>,
    /// The transaction being queued, between `MULTI` and `EXEC`.
    pub transaction: Option<Transaction>,
}

impl Session {
    /// Bytes the queued transaction holds (the server charges them to its
    /// buffer budget).
    pub fn queued_bytes(&self) -> usize {
        self.transaction.as_ref().map_or(0, |t| t.bytes)
    }
}

/// A transaction being queued: `MULTI`, then commands, each answered
/// `+QUEUED`, then `EXEC` runs them in order and answers with an array of
/// their replies (or `DISCARD` drops them). A command refused while
/// queueing (unknown, wrong number of arguments, or past
/// [`MAX_QUEUED_BYTES`]) makes `EXEC` run none of them (`-EXECABORT`), as
/// in redis; an error while running one is its reply, and the others run.
///
/// redis-py's `pipeline()` is a transaction unless told otherwise.
///
/// What `EXEC` promises, as redis does: its commands run back to back, no
/// other client's command (nor an in-process caller) runs between them
/// ([`Cache::atomically`]), and a restart finds all of their writes or none:
/// they are logged as one record with one CRC (a transaction whose records
/// would pass the log's 64 MiB record limit is logged record by record,
/// without that guarantee). The records are covered by the batch's commit
/// (under `fsync always`, one `fdatasync`), and no reply leaves before it.
/// `WATCH` is not supported.
#[derive(Debug, Clone, Default)]
pub struct Transaction {
    /// Each queued command's name and arguments (copies: they outlive the
    /// read buffer's use).
    commands: Vec<(&'static str, Vec<Bytes>)>,
    /// What the queue holds, counted as [`queued_cost`] does.
    bytes: usize,
    /// A command was refused while queueing: `EXEC` discards the lot.
    failed: bool,
}

impl Transaction {
    fn fail(&mut self) {
        self.failed = true;
        // Nothing queued will run: let it go now.
        self.commands = Vec::new();
        self.bytes = 0;
    }
}

/// Most a transaction may queue (64 MiB, counting each argument's bytes
/// plus 64, and 64 per command).
pub const MAX_QUEUED_BYTES: usize = 64 << 20;

/// Most an `EXEC` reply may hold (the `MGET` cap): replies past it are
/// replaced with an error saying so (their commands still ran).
pub const MAX_EXEC_REPLY_BYTES: usize = MAX_MGET_REPLY_BYTES;

fn queued_cost(args: &[Bytes]) -> usize {
    64 + args.iter().map(|a| a.len() + 64).sum::<usize>()
}

/// How many arguments (after its name) a command takes.
#[derive(Debug, Clone, Copy)]
enum Arity {
    Exact(usize),
    Between(usize, usize),
    AtLeast(usize),
    /// One or more key-value pairs.
    Pairs,
}

impl Arity {
    fn fits(self, n: usize) -> bool {
        match self {
            Arity::Exact(k) => n == k,
            Arity::Between(lo, hi) => (lo..=hi).contains(&n),
            Arity::AtLeast(k) => n >= k,
            Arity::Pairs => n >= 2 && n % 2 == 0,
        }
    }
}

/// Every command this server runs, and the arguments it takes. `dispatch`
/// checks the counts itself, on the hot path; a test keeps the two in step.
const COMMANDS: &[(&str, Arity)] = &[
    ("PING", Arity::Between(0, 1)),
    ("ECHO", Arity::Exact(1)),
    ("HELLO", Arity::AtLeast(0)),
    ("GET", Arity::Exact(1)),
    ("SET", Arity::AtLeast(2)),
    ("DEL", Arity::AtLeast(1)),
    ("EXISTS", Arity::AtLeast(1)),
    ("EXPIRE", Arity::AtLeast(2)),
    ("PEXPIRE", Arity::AtLeast(2)),
    ("PERSIST", Arity::Exact(1)),
    ("TTL", Arity::Exact(1)),
    ("PTTL", Arity::Exact(1)),
    ("MGET", Arity::AtLeast(1)),
    ("MSET", Arity::Pairs),
    ("DBSIZE", Arity::Exact(0)),
    ("INFO", Arity::AtLeast(0)),
    ("CLIENT", Arity::AtLeast(1)),
    ("AUTH", Arity::AtLeast(1)),
    ("SELECT", Arity::Exact(1)),
    ("COMMAND", Arity::AtLeast(0)),
    ("CONFIG", Arity::AtLeast(1)),
    ("AGENT.GET", Arity::Between(2, 3)),
    ("AGENT.SET", Arity::AtLeast(3)),
    ("AGENT.DEL", Arity::Between(2, 3)),
    ("AGENT.FLUSH", Arity::Exact(1)),
    ("MULTI", Arity::Exact(0)),
    ("EXEC", Arity::Exact(0)),
    ("DISCARD", Arity::Exact(0)),
    ("QUIT", Arity::AtLeast(0)),
];

fn lookup(name: &str) -> Option<(&'static str, Arity)> {
    COMMANDS.iter().copied().find(|(n, _)| *n == name)
}

/// The RESP server's connection counters, shown by `INFO` under
/// `# Clients` (names as in redis where the meaning matches). The server
/// updates them; plain atomics, read without locking.
#[derive(Debug, Default)]
pub struct ClientStats {
    /// Connections being served.
    pub connected: AtomicU64,
    /// Connections refused because `max_connections` were open.
    pub rejected: AtomicU64,
    /// Connections closed because their buffers did not fit the server's
    /// buffer budget.
    pub over_budget: AtomicU64,
    /// Connections closed because the client read none of its replies
    /// for the server's `write_stall_timeout`.
    pub stalled: AtomicU64,
    /// Bytes of the buffer budget held by connections now.
    pub buffered_bytes: AtomicU64,
    /// The buffer budget (`max_buffered_bytes`).
    pub buffer_limit: u64,
}

impl ClientStats {
    /// Counters for a server whose buffer budget is `buffer_limit` bytes.
    pub fn new(buffer_limit: u64) -> Self {
        Self {
            buffer_limit,
            ..Self::default()
        }
    }
}

/// What to do after a command.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// The reply to send.
    pub reply: Reply,
    /// Close the connection after sending it (`QUIT`).
    pub close: bool,
}

impl From<Reply> for Outcome {
    fn from(reply: Reply) -> Self {
        Self {
            reply,
            close: false,
        }
    }
}

fn wrong_args(name: &str) -> Reply {
    Reply::err(format!(
        "wrong number of arguments for '{}' command",
        name.to_ascii_lowercase()
    ))
}

fn syntax_error() -> Reply {
    Reply::err("syntax error")
}

fn not_integer() -> Reply {
    Reply::err("value is not an integer or out of range")
}

fn cache_error(e: &CacheError) -> Reply {
    Reply::err(e)
}

/// An integer argument written as redis requires: an optional `-`, then
/// digits with no leading zero (`0` alone aside); no `+`, no spaces.
fn parse_int(b: &[u8]) -> Option<i64> {
    let digits = b.strip_prefix(b"-").unwrap_or(b);
    let canonical = match digits {
        [b'0'] => b.len() == 1,
        [b'1'..=b'9', rest @ ..] => rest.iter().all(u8::is_ascii_digit),
        _ => false,
    };
    if !canonical {
        return None;
    }
    std::str::from_utf8(b).ok()?.parse().ok()
}

/// A positive TTL argument (`EX`/`PX`), in milliseconds per `unit_ms`,
/// whose deadline (from `now_ms`) fits a signed 64-bit count of
/// milliseconds, as redis requires.
fn positive_ttl(b: &[u8], unit_ms: u64, cmd: &str, now_ms: u64) -> Result<Duration, Reply> {
    let n = parse_int(b).ok_or_else(not_integer)?;
    let n = u64::try_from(n)
        .ok()
        .filter(|n| *n > 0)
        .and_then(|n| n.checked_mul(unit_ms))
        .filter(|ms| fits_deadline(*ms, now_ms))
        .ok_or_else(|| invalid_expire(cmd))?;
    Ok(Duration::from_millis(n))
}

fn fits_deadline(ms: u64, now_ms: u64) -> bool {
    ms.checked_add(now_ms)
        .is_some_and(|t| i64::try_from(t).is_ok())
}

fn invalid_expire(cmd: &str) -> Reply {
    Reply::err(format!("invalid expire time in '{cmd}' command"))
}

/// A stored value gets its own allocation: a decoded argument is usually a
/// slice of the connection's read buffer, and keeping it would pin that whole
/// buffer (up to the frame budget) in the cache, outside the byte bound.
/// A large argument the decoder received into its own exactly-sized buffer
/// (see [`crate::resp::DIRECT_BULK_MIN`]) is kept as it is: nothing else
/// refers to that buffer. A slice of the read buffer is never the only
/// reference to it while the command runs (the connection's buffer or the
/// other arguments share it, and the decoder copies a large argument left
/// alone in a replaced read buffer), so `is_unique` tells the two apart.
fn owned(v: &Bytes) -> Bytes {
    if v.len() >= DIRECT_BULK_MIN && v.is_unique() {
        v.clone()
    } else {
        Bytes::copy_from_slice(v)
    }
}

fn bulk_or_null(v: Option<Bytes>) -> Reply {
    v.map_or(Reply::Null, Reply::Bulk)
}

fn upper(b: &[u8]) -> String {
    String::from_utf8_lossy(b).to_ascii_uppercase()
}

/// Turn a frame into command arguments.
fn arguments(frame: Frame) -> Result<Vec<Bytes>, Reply> {
    let Frame::Array(items) = frame else {
        return Err(Reply::err(
            "Protocol error: expected an array of bulk strings",
        ));
    };
    items
        .into_iter()
        .map(|f| match f {
            Frame::Bulk(b) => Ok(b),
            _ => Err(Reply::err(
                "Protocol error: command arguments must be bulk strings",
            )),
        })
        .collect()
}

/// Execute one decoded frame.
pub fn execute(cache: &Cache, session: &mut Session, frame: Frame) -> Outcome {
    match arguments(frame) {
        Ok(args) => execute_args(cache, session, &args),
        Err(r) => r.into(),
    }
}

/// Execute one command given as its arguments (what
/// [`crate::resp::Decoder::decode_command`] produces).
pub fn execute_args(cache: &Cache, session: &mut Session, args: &[Bytes]) -> Outcome {
    let Some(raw) = args.first() else {
        return Reply::err("empty command").into();
    };
    // Upper-case the name on the stack: every command pays for this.
    let mut stack = [0u8; 24];
    let heap;
    let name: &str = match stack.get_mut(..raw.len()) {
        Some(slot) => {
            slot.copy_from_slice(raw);
            slot.make_ascii_uppercase();
            match std::str::from_utf8(slot) {
                Ok(n) => n,
                Err(_) => {
                    heap = upper(raw);
                    &heap
                }
            }
        }
        None => {
            heap = upper(raw);
            &heap
        }
    };
    if name == "QUIT" {
        return Outcome {
            reply: Reply::ok(),
            close: true,
        };
    }
    if session.transaction.is_some() {
        return in_transaction(cache, session, name, args).into();
    }
    match (name, args.len()) {
        ("MULTI", 1) => {
            session.transaction = Some(Transaction::default());
            Reply::ok().into()
        }
        ("EXEC" | "DISCARD", 1) => Reply::err(format!("{name} without MULTI")).into(),
        _ => dispatch(cache, session, name, &args[1..]).into(),
    }
}

/// A command between `MULTI` and `EXEC`: checked and queued, or `EXEC` /
/// `DISCARD` (see [`Transaction`]).
fn in_transaction(cache: &Cache, session: &mut Session, name: &str, args: &[Bytes]) -> Reply {
    let a = &args[1..];
    match (name, a.len()) {
        ("EXEC", 0) => return exec(cache, session),
        ("DISCARD", 0) => {
            session.transaction = None;
            return Reply::ok();
        }
        ("MULTI", 0) => return Reply::err("MULTI calls can not be nested"),
        // Refused without aborting the transaction, as in redis (without
        // a key it is refused for that, which aborts, below).
        ("WATCH", n) if n >= 1 => return Reply::err("WATCH inside MULTI is not allowed"),
        // An EXEC refused ends the transaction, as in redis.
        ("EXEC", _) => {
            session.transaction = None;
            return Reply::Error(
                "EXECABORT Transaction discarded because of: \
                 wrong number of arguments for 'exec' command"
                    .into(),
            );
        }
        _ => {}
    }
    let Some(tx) = session.transaction.as_mut() else {
        return Reply::err("EXEC without MULTI");
    };
    let canonical = match lookup(name) {
        None if name == "WATCH" => {
            tx.fail();
            return wrong_args(name);
        }
        None => {
            tx.fail();
            return unknown_command(name, a);
        }
        Some((_, arity)) if !arity.fits(a.len()) => {
            tx.fail();
            return wrong_args(name);
        }
        Some((canonical, _)) => canonical,
    };
    if !tx.failed {
        let cost = queued_cost(a);
        if tx.bytes + cost > MAX_QUEUED_BYTES {
            tx.fail();
            return Reply::err(format!(
                "a transaction may queue at most {MAX_QUEUED_BYTES} bytes; EXEC will discard it"
            ));
        }
        tx.commands.push((canonical, a.iter().map(owned).collect()));
        tx.bytes += cost;
    }
    Reply::Simple("QUEUED".into())
}

/// Runs a queued transaction: an array of the commands' replies.
fn exec(cache: &Cache, session: &mut Session) -> Reply {
    let Some(tx) = session.transaction.take() else {
        return Reply::err("EXEC without MULTI");
    };
    if tx.failed {
        return Reply::Error("EXECABORT Transaction discarded because of previous errors.".into());
    }
    let mut total = 0usize;
    let replies = cache.atomically(|| {
        tx.commands
            .into_iter()
            .map(|(name, a)| {
                let reply = dispatch(cache, session, name, &a);
                let size = reply_bytes(&reply);
                if total.saturating_add(size) > MAX_EXEC_REPLY_BYTES {
                    Reply::err(format!(
                        "the EXEC reply would exceed {MAX_EXEC_REPLY_BYTES} bytes; \
                         this command ran, its reply is left out"
                    ))
                } else {
                    total += size;
                    reply
                }
            })
            .collect()
    });
    match replies {
        Ok(replies) => Reply::Array(replies),
        // The log takes no writes, so nothing ran; or, outside the
        // server's batches (which commit themselves), the commit failed
        // and none of the writes is acknowledged.
        Err(e) => cache_error(&e),
    }
}

/// About what a reply holds once encoded.
fn reply_bytes(r: &Reply) -> usize {
    16 + match r {
        Reply::Bulk(b) | Reply::Verbatim(b) => b.len(),
        Reply::Simple(s) => s.len(),
        Reply::Error(s) => s.len(),
        Reply::Integer(_) | Reply::Null => 0,
        Reply::Array(items) => items.iter().map(reply_bytes).sum(),
        Reply::Map(pairs) => pairs
            .iter()
            .map(|(k, v)| reply_bytes(k) + reply_bytes(v))
            .sum(),
    }
}

fn unknown_command(name: &str, a: &[Bytes]) -> Reply {
    let first = a
        .first()
        .map(|b| String::from_utf8_lossy(&b[..b.len().min(64)]).into_owned())
        .unwrap_or_default();
    Reply::err(format!(
        "unknown command '{}', with args beginning with: '{first}'",
        clip(name, 64)
    ))
}

/// At most `max` bytes of `s`, cut at a character boundary (a name from
/// the client may hold any UTF-8, and slicing inside a character panics).
pub(crate) fn clip(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn dispatch(cache: &Cache, session: &mut Session, name: &str, a: &[Bytes]) -> Reply {
    match (name, a.len()) {
        ("PING", 0) => Reply::Simple("PONG".into()),
        // What outlives the command (a reply waiting to be written, a
        // name) must not be a slice of the read buffer, as a stored value
        // must not (see `owned`).
        ("PING", 1) | ("ECHO", 1) => Reply::Bulk(owned(&a[0])),
        ("HELLO", _) => hello(session, a),
        ("GET", 1) => bulk_or_null(cache.get_plain(&a[0])),
        ("SET", n) if n >= 2 => set(cache, a),
        ("DEL", n) if n >= 1 => count(a.iter().map(|k| cache.del_plain(k))),
        ("EXISTS", n) if n >= 1 => count(a.iter().map(|k| Ok(cache.exists(k)))),
        ("EXPIRE", n) if n >= 2 => expire(cache, a, 1_000, "expire"),
        ("PEXPIRE", n) if n >= 2 => expire(cache, a, 1, "pexpire"),
        ("PERSIST", 1) => match cache.ttl(&a[0]) {
            KeyTtl::Remaining(_) => match cache.expire(&a[0], None) {
                Ok(_) => Reply::Integer(1),
                Err(e) => cache_error(&e),
            },
            KeyTtl::Missing | KeyTtl::Persistent => Reply::Integer(0),
        },
        ("TTL", 1) => ttl_reply(cache.ttl(&a[0]), true),
        ("PTTL", 1) => ttl_reply(cache.ttl(&a[0]), false),
        ("MGET", n) if n >= 1 => mget(cache, a),
        ("MSET", n) if n >= 2 && n % 2 == 0 => mset(cache, a),
        ("DBSIZE", 0) => Reply::Integer(i64::try_from(cache.len()).unwrap_or(i64::MAX)),
        ("INFO", _) => Reply::Verbatim(Bytes::from(info_sections(
            cache,
            session.clients.as_deref(),
            &InfoSelection::parse(a),
        ))),
        ("CLIENT", n) if n >= 1 => client(session, a),
        ("AUTH", 1) => Reply::err(
            "AUTH <password> called without any password configured for the default user. \
             Are you sure your configuration is correct?",
        ),
        ("AUTH", 2) => auth(&a[0]).map_or_else(|e| e, |()| Reply::ok()),
        ("AUTH", n) if n > 2 => syntax_error(),
        ("SELECT", 1) => match parse_int(&a[0]) {
            Some(0) => Reply::ok(),
            Some(_) => Reply::err("DB index is out of range"),
            None => not_integer(),
        },
        ("COMMAND", 1) if upper(&a[0]) == "COUNT" => {
            Reply::Integer(i64::try_from(COMMANDS.len()).unwrap_or(i64::MAX))
        }
        ("COMMAND", _) => Reply::Array(Vec::new()),
        // No parameter is readable: an empty map (RESP3), as redis-server
        // answers for a name it does not have.
        ("CONFIG", n) if n >= 2 && upper(&a[0]) == "GET" => Reply::Map(Vec::new()),
        ("CONFIG", n) if n >= 1 => {
            let sub = upper(&a[0]);
            Reply::err(format!(
                "unknown subcommand or wrong number of arguments for 'CONFIG|{}'",
                clip(&sub, 32)
            ))
        }
        ("AGENT.GET", 2 | 3) => {
            let variant = a.get(2).map_or(&b""[..], |v| &v[..]);
            bulk_or_null(cache.get(&a[0], &a[1], variant))
        }
        ("AGENT.SET", n) if n >= 3 => agent_set(cache, a),
        ("AGENT.DEL", 2 | 3) => {
            let variant = a.get(2).map_or(&b""[..], |v| &v[..]);
            match cache.invalidate(&a[0], &a[1], variant) {
                Ok(gone) => Reply::Integer(i64::from(gone)),
                Err(e) => cache_error(&e),
            }
        }
        ("AGENT.FLUSH", 1) => match cache.invalidate_agent(&a[0]) {
            Ok(n) => Reply::Integer(i64::try_from(n).unwrap_or(i64::MAX)),
            Err(e) => cache_error(&e),
        },
        _ if lookup(name).is_some() => wrong_args(name),
        _ => unknown_command(name, a),
    }
}

fn count(results: impl Iterator<Item = Result<bool, CacheError>>) -> Reply {
    let mut n = 0i64;
    for r in results {
        match r {
            Ok(true) => n += 1,
            Ok(false) => {}
            Err(e) => return cache_error(&e),
        }
    }
    Reply::Integer(n)
}

/// Longest client name (1 KiB): a session keeps it for the connection's
/// life, outside the server's buffer budget. Redis sets no limit, but
/// names are labels such as "worker-3".
pub const MAX_CLIENT_NAME: usize = 1024;

/// `AUTH user password` (also in `HELLO`): the endpoint has no passwords
/// (it listens on loopback and a Unix socket only), so, as redis with its
/// `default` user and no password set, that user is let in with any
/// password and every other name is refused.
fn auth(user: &[u8]) -> Result<(), Reply> {
    if user == b"default" {
        Ok(())
    } else {
        Err(Reply::Error(
            "WRONGPASS invalid username-password pair or user is disabled.".into(),
        ))
    }
}

/// A name for `CLIENT SETNAME` or `HELLO ... SETNAME`, checked.
fn client_name(raw: &Bytes) -> Result<Bytes, Reply> {
    // Printable ASCII without spaces, as redis allows.
    if raw.iter().any(|b| !(b'!'..=b'~').contains(b)) {
        return Err(Reply::err(
            "Client names cannot contain spaces, newlines or special characters.",
        ));
    }
    if raw.len() > MAX_CLIENT_NAME {
        return Err(Reply::err(format!(
            "Client names are limited to {MAX_CLIENT_NAME} bytes"
        )));
    }
    Ok(owned(raw))
}

fn hello(session: &mut Session, a: &[Bytes]) -> Reply {
    // Everything is checked before anything changes, as in redis.
    let mut rest = a;
    let mut protocol = session.protocol;
    let mut name = None;
    if let Some(v) = a.first() {
        match parse_int(v) {
            Some(2) => protocol = Protocol::Resp2,
            Some(3) => protocol = Protocol::Resp3,
            Some(_) => return Reply::Error("NOPROTO unsupported protocol version".into()),
            None => return Reply::err("Protocol version is not an integer or out of range"),
        }
        rest = &a[1..];
    }
    while let Some(opt) = rest.first() {
        match (upper(opt).as_str(), rest.len()) {
            ("SETNAME", n) if n >= 2 => {
                match client_name(&rest[1]) {
                    Ok(n) => name = Some(n),
                    Err(e) => return e,
                }
                rest = &rest[2..];
            }
            ("AUTH", n) if n >= 3 => {
                if let Err(e) = auth(&rest[1]) {
                    return e;
                }
                rest = &rest[3..];
            }
            _ => {
                let raw = String::from_utf8_lossy(opt);
                return Reply::err(format!("Syntax error in HELLO option '{}'", clip(&raw, 32)));
            }
        }
    }
    session.protocol = protocol;
    if let Some(n) = name {
        session.name = (!n.is_empty()).then_some(n);
    }
    let proto = match session.protocol {
        Protocol::Resp2 => 2,
        Protocol::Resp3 => 3,
    };
    Reply::Map(vec![
        (Reply::text("server"), Reply::text(SERVER_NAME)),
        (Reply::text("version"), Reply::text(COMPAT_VERSION)),
        (Reply::text("proto"), Reply::Integer(proto)),
        (
            Reply::text("id"),
            Reply::Integer(i64::try_from(session.id).unwrap_or(i64::MAX)),
        ),
        (Reply::text("mode"), Reply::text("standalone")),
        (Reply::text("role"), Reply::text("master")),
        (Reply::text("modules"), Reply::Array(Vec::new())),
    ])
}

fn set(cache: &Cache, a: &[Bytes]) -> Reply {
    /// The option that gives a SET its expiry.
    #[derive(Clone, Copy, PartialEq)]
    enum By {
        Ex,
        Px,
        ExAt,
        PxAt,
        KeepTtl,
    }
    let (key, value) = (&a[0], &a[1]);
    let mut options = SetOptions::default();
    // Repeating the expiry's option is allowed (the last counts), mixing
    // it with another is not, as in redis; NX and XX likewise.
    let mut expiry_by = None;
    let mut expiry_arg = None;
    let mut i = 2;
    while i < a.len() {
        let by = match upper(&a[i]).as_str() {
            "NX" if options.condition != SetCondition::IfPresent => {
                options.condition = SetCondition::IfAbsent;
                None
            }
            "XX" if options.condition != SetCondition::IfAbsent => {
                options.condition = SetCondition::IfPresent;
                None
            }
            "GET" => {
                options.get = true;
                None
            }
            "KEEPTTL" => Some(By::KeepTtl),
            "EX" => Some(By::Ex),
            "PX" => Some(By::Px),
            "EXAT" => Some(By::ExAt),
            "PXAT" => Some(By::PxAt),
            _ => return syntax_error(),
        };
        if let Some(by) = by {
            if expiry_by.is_some_and(|b| b != by) {
                return syntax_error();
            }
            expiry_by = Some(by);
            if by != By::KeepTtl {
                let Some(arg) = a.get(i + 1) else {
                    return syntax_error();
                };
                expiry_arg = Some(arg);
                i += 1;
            }
        }
        i += 1;
    }
    // The time is read once every option has been (a syntax error comes
    // first, as in redis).
    let expiry = match (expiry_by, expiry_arg) {
        (Some(By::KeepTtl), _) => Ok(SetExpiry::Keep),
        (Some(By::Ex), Some(arg)) => {
            positive_ttl(arg, 1_000, "set", cache.now_ms()).map(SetExpiry::After)
        }
        (Some(By::Px), Some(arg)) => {
            positive_ttl(arg, 1, "set", cache.now_ms()).map(SetExpiry::After)
        }
        (Some(By::ExAt), Some(arg)) => deadline(arg, 1_000, "set").map(SetExpiry::At),
        (Some(By::PxAt), Some(arg)) => deadline(arg, 1, "set").map(SetExpiry::At),
        _ => Ok(SetExpiry::Never),
    };
    match expiry {
        Ok(e) => options.expiry = e,
        Err(r) => return r,
    }
    match cache.set_plain_with(key, owned(value), options) {
        // With GET, the reply is the value replaced (or nil), written or not.
        Ok(done) if options.get => bulk_or_null(done.old),
        Ok(done) if done.written => Reply::ok(),
        Ok(_) => Reply::Null,
        Err(e) => cache_error(&e),
    }
}

/// An absolute expiry (`EXAT`, `PXAT`) as Unix milliseconds: positive,
/// and within signed 64-bit milliseconds, as redis requires.
fn deadline(b: &[u8], unit_ms: u64, cmd: &str) -> Result<u64, Reply> {
    let n = parse_int(b).ok_or_else(not_integer)?;
    u64::try_from(n)
        .ok()
        .filter(|n| *n > 0)
        .and_then(|n| n.checked_mul(unit_ms))
        .filter(|ms| i64::try_from(*ms).is_ok())
        .ok_or_else(|| invalid_expire(cmd))
}

fn expire(cache: &Cache, a: &[Bytes], unit_ms: i64, cmd: &str) -> Reply {
    // Options first, as redis checks them.
    let mut condition = ExpireCondition::default();
    for opt in &a[2..] {
        match upper(opt).as_str() {
            "NX" => condition.if_none = true,
            "XX" => condition.if_some = true,
            "GT" => condition.if_later = true,
            "LT" => condition.if_sooner = true,
            _ => {
                let raw = String::from_utf8_lossy(opt);
                return Reply::err(format!("Unsupported option {}", clip(&raw, 32)));
            }
        }
    }
    if condition.if_none && (condition.if_some || condition.if_later || condition.if_sooner) {
        return Reply::err("NX and XX, GT or LT options at the same time are not compatible");
    }
    if condition.if_later && condition.if_sooner {
        return Reply::err("GT and LT options at the same time are not compatible");
    }
    let Some(n) = parse_int(&a[1]) else {
        return not_integer();
    };
    // Zero or negative deletes the key, as in redis; a time that does not
    // fit (a deadline past the signed 64-bit milliseconds) is refused and
    // changes nothing.
    let Some(ms) = n.checked_mul(unit_ms) else {
        return invalid_expire(cmd);
    };
    let ms = u64::try_from(ms).unwrap_or(0);
    if !fits_deadline(ms, cache.now_ms()) {
        return invalid_expire(cmd);
    }
    match cache.expire_if(&a[0], Some(Duration::from_millis(ms)), condition) {
        Ok(found) => Reply::Integer(i64::from(found)),
        Err(e) => cache_error(&e),
    }
}

fn ttl_reply(t: KeyTtl, seconds: bool) -> Reply {
    match t {
        KeyTtl::Missing => Reply::Integer(-2),
        KeyTtl::Persistent => Reply::Integer(-1),
        KeyTtl::Remaining(ms) => {
            // Rounded to the nearest second, as redis does.
            let v = if seconds { (ms + 500) / 1_000 } else { ms };
            Reply::Integer(i64::try_from(v).unwrap_or(i64::MAX))
        }
    }
}

/// Largest `MGET` reply (64 MiB): replies are built in memory, so their size
/// is bounded like the requests'.
pub const MAX_MGET_REPLY_BYTES: usize = 64 << 20;

fn mget(cache: &Cache, a: &[Bytes]) -> Reply {
    let mut total = 0usize;
    let mut items = Vec::with_capacity(a.len());
    for k in a {
        let v = cache.get_plain(k);
        total = total.saturating_add(v.as_ref().map_or(0, Bytes::len));
        if total > MAX_MGET_REPLY_BYTES {
            return Reply::err(format!(
                "MGET reply would exceed {MAX_MGET_REPLY_BYTES} bytes; ask for fewer keys"
            ));
        }
        items.push(bulk_or_null(v));
    }
    Reply::Array(items)
}

fn mset(cache: &Cache, a: &[Bytes]) -> Reply {
    // Refuse the whole command up front if any value is too large, so an
    // MSET is not half applied for a reason known in advance.
    let max = cache.config().max_value_bytes;
    if let Some(v) = a.chunks(2).map(|kv| &kv[1]).find(|v| v.len() > max) {
        return Reply::err(format!(
            "value of {} bytes exceeds the maximum value size of {max} bytes",
            v.len()
        ));
    }
    for kv in a.chunks(2) {
        if let Err(e) = cache.set_plain(&kv[0], owned(&kv[1]), None, SetCondition::Always) {
            return cache_error(&e);
        }
    }
    Reply::ok()
}

fn agent_set(cache: &Cache, a: &[Bytes]) -> Reply {
    let (agent, prompt, response) = (&a[0], &a[1], &a[2]);
    let mut ttl = None;
    let mut variant: &[u8] = b"";
    let mut rest = &a[3..];
    while let Some(opt) = rest.first() {
        let Some(arg) = rest.get(1) else {
            return syntax_error();
        };
        match upper(opt).as_str() {
            "EX" if ttl.is_none() => match positive_ttl(arg, 1_000, "agent.set", cache.now_ms()) {
                Ok(d) => ttl = Some(d),
                Err(r) => return r,
            },
            "PX" if ttl.is_none() => match positive_ttl(arg, 1, "agent.set", cache.now_ms()) {
                Ok(d) => ttl = Some(d),
                Err(r) => return r,
            },
            "VARIANT" => variant = arg,
            _ => return syntax_error(),
        }
        rest = &rest[2..];
    }
    match cache.put(agent, prompt, variant, owned(response), ttl) {
        Ok(()) => Reply::ok(),
        Err(e) => cache_error(&e),
    }
}

fn client(session: &mut Session, a: &[Bytes]) -> Reply {
    match (upper(&a[0]).as_str(), a.len()) {
        ("SETNAME", 2) => match client_name(&a[1]) {
            Ok(name) => {
                session.name = (!name.is_empty()).then_some(name);
                Reply::ok()
            }
            Err(e) => e,
        },
        ("GETNAME", 1) => bulk_or_null(session.name.clone()),
        ("ID", 1) => Reply::Integer(i64::try_from(session.id).unwrap_or(i64::MAX)),
        // Client libraries announce themselves; accept and ignore.
        ("SETINFO", 3) => Reply::ok(),
        (sub, _) => Reply::err(format!(
            "unknown subcommand or wrong number of arguments for 'CLIENT|{}'",
            clip(sub, 32)
        )),
    }
}

/// The `INFO` text: Redis-style sections plus our statistics.
pub fn info(cache: &Cache) -> String {
    info_sections(cache, None, &InfoSelection::All)
}

/// Which sections `INFO` prints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InfoSelection {
    /// Every section: no argument, or `default`, `all` or `everything`
    /// (the server has no section that is costly to gather).
    All,
    /// The sections named, in any order and any case; a name the server
    /// does not have selects nothing, as in redis.
    Named(Vec<String>),
}

impl InfoSelection {
    /// The selection for `INFO`'s arguments (section names, any case).
    pub fn parse(args: &[Bytes]) -> Self {
        let names: Vec<String> = args
            .iter()
            .map(|a| String::from_utf8_lossy(a).to_ascii_lowercase())
            .collect();
        if names.is_empty()
            || names
                .iter()
                .any(|n| matches!(n.as_str(), "default" | "all" | "everything"))
        {
            Self::All
        } else {
            Self::Named(names)
        }
    }

    fn wants(&self, section: &str) -> bool {
        match self {
            Self::All => true,
            Self::Named(names) => names.iter().any(|n| n.eq_ignore_ascii_case(section)),
        }
    }
}

/// The `INFO` text for the sections `which` selects, in the server's order,
/// each a `# Name` line and its `field:value` lines, separated by an empty
/// line. Nothing selected gives an empty text, as in redis.
pub fn info_sections(
    cache: &Cache,
    clients: Option<&ClientStats>,
    which: &InfoSelection,
) -> String {
    let mut text = String::new();
    let mut add = |name: &str, body: &dyn Fn() -> String| {
        if which.wants(name) {
            if !text.is_empty() {
                text.push_str("\r\n");
            }
            text.push_str("# ");
            text.push_str(name);
            text.push_str("\r\n");
            text.push_str(&body());
        }
    };
    let s = cache.stats();
    add("Server", &|| {
        format!(
            "redis_version:{COMPAT_VERSION}\r\nserver_name:{SERVER_NAME}\r\n\
             appliance_cache_version:{}\r\n",
            env!("CARGO_PKG_VERSION")
        )
    });
    add("Memory", &|| {
        format!(
            "used_memory:{}\r\nmaxmemory:{}\r\nmaxmemory_policy:allkeys-lru\r\n",
            s.bytes, s.capacity_bytes
        )
    });
    add("Stats", &|| {
        format!(
            "keyspace_hits:{}\r\nkeyspace_misses:{}\r\nexpired_keys:{}\r\nevicted_keys:{}\r\n",
            s.hits, s.misses, s.expirations, s.evictions
        )
    });
    add("Cache", &|| {
        format!(
            "hits:{}\r\nmisses:{}\r\nhit_rate:{:.4}\r\ncollisions:{}\r\nevictions:{}\r\n\
             expirations:{}\r\nentries:{}\r\nbytes:{}\r\n",
            s.hits,
            s.misses,
            s.hit_rate,
            s.collisions,
            s.evictions,
            s.expirations,
            s.entries,
            s.bytes
        )
    });
    add("Keyspace", &|| {
        format!("db0:keys={},expires={}\r\n", s.entries, s.entries_with_ttl)
    });
    // Named as in redis where the meaning matches (a compaction is our AOF
    // rewrite), so tools that wait for `aof_rewrite_in_progress:0` work.
    if let Some(p) = cache.persistence() {
        add("Persistence", &|| {
            let ps = p.stats();
            format!(
                "aof_enabled:1\r\naof_rewrite_in_progress:{}\r\n\
                 aof_rewrites:{}\r\naof_last_write_status:{}\r\nlog_heals:{}\r\n\
                 log_records:{}\r\nlog_bytes:{}\r\nlog_spare_in_progress:{}\r\nfsync:{}\r\n",
                u8::from(ps.compacting),
                ps.compactions,
                if ps.failed.is_some() { "err" } else { "ok" },
                ps.heals,
                ps.log_records,
                ps.log_bytes,
                u8::from(ps.writing_spare),
                match p.fsync() {
                    Fsync::Always => "always".to_string(),
                    Fsync::IntervalMs(ms) => format!("interval:{ms}"),
                },
            )
        });
    }
    if let Some(c) = clients {
        add("Clients", &|| {
            format!(
                "connected_clients:{}\r\nrejected_connections:{}\r\n\
                 client_buffer_bytes:{}\r\nclient_buffer_limit:{}\r\n\
                 clients_closed_over_buffer_limit:{}\r\n\
                 clients_closed_not_reading:{}\r\n",
                c.connected.load(Ordering::Relaxed),
                c.rejected.load(Ordering::Relaxed),
                c.buffered_bytes.load(Ordering::Relaxed),
                c.buffer_limit,
                c.over_budget.load(Ordering::Relaxed),
                c.stalled.load(Ordering::Relaxed),
            )
        });
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::CacheConfig;
    use crate::clock::ManualClock;
    use std::sync::Arc;

    fn cmd(parts: &[&str]) -> Frame {
        Frame::Array(
            parts
                .iter()
                .map(|p| Frame::Bulk(Bytes::copy_from_slice(p.as_bytes())))
                .collect(),
        )
    }

    fn run(cache: &Cache, s: &mut Session, parts: &[&str]) -> Reply {
        execute(cache, s, cmd(parts)).reply
    }

    fn bulk(s: &str) -> Reply {
        Reply::Bulk(Bytes::copy_from_slice(s.as_bytes()))
    }

    fn queued() -> Reply {
        Reply::Simple("QUEUED".into())
    }

    #[test]
    fn multi_queues_and_exec_runs_in_order() {
        let (_, c, mut s) = setup();
        assert_eq!(run(&c, &mut s, &["MULTI"]), Reply::ok());
        assert_eq!(run(&c, &mut s, &["SET", "a", "1"]), queued());
        assert_eq!(run(&c, &mut s, &["get", "a"]), queued());
        // An error while running is that command's reply; the rest run.
        assert_eq!(run(&c, &mut s, &["EXPIRE", "a", "soon"]), queued());
        assert_eq!(run(&c, &mut s, &["MSET", "b", "2", "a", "3"]), queued());
        assert_eq!(
            run(&c, &mut s, &["MULTI"]),
            Reply::err("MULTI calls can not be nested")
        );
        assert_eq!(c.get_plain(b"a"), None, "nothing runs before EXEC");
        assert_eq!(
            run(&c, &mut s, &["EXEC"]),
            Reply::Array(vec![Reply::ok(), bulk("1"), not_integer(), Reply::ok()])
        );
        assert_eq!(c.get_plain(b"a").as_deref(), Some(&b"3"[..]));
        assert_eq!(s.queued_bytes(), 0);
        // Back to running commands at once.
        assert_eq!(run(&c, &mut s, &["GET", "b"]), bulk("2"));
        assert_eq!(run(&c, &mut s, &["EXEC"]), Reply::err("EXEC without MULTI"));
        assert_eq!(
            run(&c, &mut s, &["DISCARD"]),
            Reply::err("DISCARD without MULTI")
        );
        assert_eq!(run(&c, &mut s, &["MULTI", "x"]), wrong_args("MULTI"));
    }

    /// EXEC's writes reach the log as one record, whether it runs in a
    /// batch of the server (inside `defer`) or on its own.
    #[test]
    fn exec_logs_its_writes_as_one_record() {
        let tmp = tempfile::tempdir().unwrap();
        let open = || {
            Cache::open(
                CacheConfig::default(),
                crate::PersistConfig::new(tmp.path()),
            )
            .unwrap()
        };
        {
            let (c, _) = open();
            let mut s = Session::default();
            for parts in [
                &["MULTI"][..],
                &["SET", "a", "1"],
                &["MSET", "b", "2", "c", "3"],
            ] {
                run(&c, &mut s, parts);
            }
            let (reply, pending) = c.defer(|| run(&c, &mut s, &["EXEC"]));
            c.commit(pending.unwrap()).unwrap();
            assert_eq!(reply, Reply::Array(vec![Reply::ok(), Reply::ok()]));
            for parts in [&["MULTI"][..], &["DEL", "a"], &["SET", "d", "4"], &["EXEC"]] {
                run(&c, &mut s, parts);
            }
        }
        let (c, report) = open();
        assert_eq!(report.records_read, 2, "one record per EXEC");
        assert_eq!(c.len(), 3);
        assert!(!c.exists(b"a"));
    }

    #[test]
    fn a_command_refused_while_queueing_aborts_the_transaction() {
        let (_, c, mut s) = setup();
        for refused in [&["SET", "x"][..], &["NOSUCH", "x"], &["GET"]] {
            assert_eq!(run(&c, &mut s, &["MULTI"]), Reply::ok());
            assert_eq!(run(&c, &mut s, &["SET", "a", "1"]), queued());
            assert!(
                matches!(run(&c, &mut s, refused), Reply::Error(_)),
                "{refused:?}"
            );
            assert_eq!(run(&c, &mut s, &["SET", "b", "1"]), queued());
            assert_eq!(s.queued_bytes(), 0, "a doomed queue is let go");
            assert_eq!(
                run(&c, &mut s, &["EXEC"]),
                Reply::Error("EXECABORT Transaction discarded because of previous errors.".into())
            );
            assert!(c.is_empty(), "nothing ran after {refused:?}");
        }
        // An EXEC refused ends the transaction at once; WATCH is refused
        // without ending it.
        assert_eq!(run(&c, &mut s, &["MULTI"]), Reply::ok());
        assert_eq!(run(&c, &mut s, &["SET", "a", "1"]), queued());
        assert_eq!(
            run(&c, &mut s, &["WATCH", "a"]),
            Reply::err("WATCH inside MULTI is not allowed")
        );
        assert!(s.queued_bytes() > 0);
        assert_eq!(run(&c, &mut s, &["WATCH"]), wrong_args("WATCH"));
        assert_eq!(s.queued_bytes(), 0, "a WATCH without a key aborts");
        assert!(matches!(
            run(&c, &mut s, &["EXEC", "now"]),
            Reply::Error(e) if e.starts_with("EXECABORT Transaction discarded because of: wrong number")
        ));
        assert!(s.transaction.is_none());
        assert_eq!(run(&c, &mut s, &["GET", "a"]), Reply::Null);
        // DISCARD drops the queue.
        assert_eq!(run(&c, &mut s, &["MULTI"]), Reply::ok());
        assert_eq!(run(&c, &mut s, &["SET", "a", "1"]), queued());
        assert!(s.queued_bytes() > 0);
        assert_eq!(run(&c, &mut s, &["DISCARD"]), Reply::ok());
        assert_eq!(s.queued_bytes(), 0);
        assert_eq!(run(&c, &mut s, &["EXEC"]), Reply::err("EXEC without MULTI"));
        assert!(c.is_empty());
    }

    #[test]
    fn a_transaction_is_bounded_in_what_it_queues_and_replies() {
        let (_, c, mut s) = setup();
        let value = "v".repeat(8 << 20);
        assert_eq!(run(&c, &mut s, &["MULTI"]), Reply::ok());
        let mut refused = 0;
        for i in 0..9 {
            if run(&c, &mut s, &["SET", &format!("k{i}"), &value]) != queued() {
                refused += 1;
            }
            assert!(s.queued_bytes() <= MAX_QUEUED_BYTES);
        }
        assert_eq!(refused, 1, "the eighth 8 MiB value fills the queue");
        assert!(
            matches!(run(&c, &mut s, &["EXEC"]), Reply::Error(e) if e.starts_with("EXECABORT"))
        );
        assert!(c.is_empty());

        // Seven GETs of 8 MiB fit in the 64 MiB reply, the eighth does not:
        // it is replaced by an error, and the SET after it still runs.
        c.set_plain(b"big", value.clone(), None, SetCondition::Always)
            .unwrap();
        assert_eq!(run(&c, &mut s, &["MULTI"]), Reply::ok());
        for _ in 0..8 {
            assert_eq!(run(&c, &mut s, &["GET", "big"]), queued());
        }
        assert_eq!(run(&c, &mut s, &["SET", "after", "1"]), queued());
        let Reply::Array(replies) = run(&c, &mut s, &["EXEC"]) else {
            panic!("EXEC did not reply with an array");
        };
        assert_eq!(replies.len(), 9);
        assert!(replies[..7].iter().all(|r| *r == bulk(&value)));
        assert!(matches!(&replies[7], Reply::Error(e) if e.contains("left out")));
        assert_eq!(replies[8], Reply::ok());
        assert_eq!(c.get_plain(b"after").as_deref(), Some(&b"1"[..]));
    }

    /// Names are cut for error messages at a character boundary: a
    /// multi-byte character across the cut once panicked the connection.
    #[test]
    fn long_names_in_errors_are_cut_between_characters() {
        let (_, c, mut s) = setup();
        let name = format!("{}\u{e9}", "a".repeat(63));
        let sub = format!("{}\u{e9}", "b".repeat(31));
        for parts in [
            vec![name.as_str(), "x"],
            vec!["CLIENT", sub.as_str()],
            vec!["CONFIG", sub.as_str()],
        ] {
            assert!(
                matches!(run(&c, &mut s, &parts), Reply::Error(_)),
                "{parts:?}"
            );
        }
        assert_eq!(clip("a\u{e9}", 2), "a");
        assert_eq!(clip("a\u{e9}", 3), "a\u{e9}");
    }

    /// The table `MULTI` checks commands against agrees with what `dispatch`
    /// runs: the counts it refuses get "wrong number of arguments" there,
    /// the ones it takes do not, and every other name is unknown.
    #[test]
    fn the_command_table_matches_dispatch() {
        let (_, c, mut s) = setup();
        for (name, arity) in COMMANDS {
            if matches!(*name, "MULTI" | "EXEC" | "DISCARD" | "QUIT") {
                continue; // handled before dispatch
            }
            for n in 0..7 {
                let args: Vec<Bytes> = (0..n).map(|_| Bytes::from_static(b"1")).collect();
                let reply = dispatch(&c, &mut s, name, &args);
                assert_eq!(
                    reply == wrong_args(name),
                    !arity.fits(n),
                    "{name} with {n} arguments: {reply:?}"
                );
            }
        }
        assert!(matches!(
            dispatch(&c, &mut s, "NOSUCH", &[]),
            Reply::Error(e) if e.starts_with("ERR unknown command")
        ));
        assert_eq!(
            run(&c, &mut s, &["COMMAND", "COUNT"]),
            Reply::Integer(COMMANDS.len() as i64)
        );
        // A map (`%0` in RESP3, an empty array in RESP2), as redis-server
        // answers a parameter it does not have; clients read it as a dict.
        assert_eq!(
            run(&c, &mut s, &["CONFIG", "GET", "save"]),
            Reply::Map(Vec::new())
        );
    }

    fn setup() -> (Arc<ManualClock>, Cache, Session) {
        let clock = Arc::new(ManualClock::new(1_000_000));
        let cache = Cache::with_clock(CacheConfig::default(), clock.clone());
        (clock, cache, Session::default())
    }

    #[test]
    fn set_options() {
        let (clock, c, mut s) = setup();
        assert_eq!(run(&c, &mut s, &["SET", "k", "v", "EX", "10"]), Reply::ok());
        assert_eq!(run(&c, &mut s, &["TTL", "k"]), Reply::Integer(10));
        assert_eq!(run(&c, &mut s, &["set", "k", "w", "nx"]), Reply::Null);
        assert_eq!(
            run(&c, &mut s, &["SET", "k", "w", "XX", "PX", "1500"]),
            Reply::ok()
        );
        assert_eq!(run(&c, &mut s, &["PTTL", "k"]), Reply::Integer(1500));
        assert_eq!(run(&c, &mut s, &["TTL", "k"]), Reply::Integer(2));
        clock.advance(Duration::from_millis(1500));
        assert_eq!(run(&c, &mut s, &["GET", "k"]), Reply::Null);
        assert_eq!(run(&c, &mut s, &["SET", "k", "v", "XX"]), Reply::Null);
        assert_eq!(
            run(&c, &mut s, &["SET", "k", "v", "EX", "0"]),
            Reply::err("invalid expire time in 'set' command")
        );
        assert_eq!(
            run(&c, &mut s, &["SET", "k", "v", "EX", "x"]),
            Reply::err("value is not an integer or out of range")
        );
        assert_eq!(
            run(&c, &mut s, &["SET", "k", "v", "NX", "XX"]),
            syntax_error()
        );
        assert_eq!(run(&c, &mut s, &["SET", "k", "v", "EX"]), syntax_error());
        assert_eq!(run(&c, &mut s, &["SET", "k"]), wrong_args("SET"));
    }

    /// Limits and option rules as redis 7 has them (found by comparing
    /// replies with redis-server 7.0.15 byte for byte).
    #[test]
    fn expiry_times_and_set_options_as_redis_takes_them() {
        let (_, c, mut s) = setup();
        let invalid = |cmd: &str| Reply::err(format!("invalid expire time in '{cmd}' command"));
        // Repeating an option is allowed, the last TTL counts; mixing is not.
        assert_eq!(run(&c, &mut s, &["SET", "k", "v", "NX", "NX"]), Reply::ok());
        assert_eq!(
            run(&c, &mut s, &["SET", "k", "v", "EX", "10", "EX", "20"]),
            Reply::ok()
        );
        assert_eq!(run(&c, &mut s, &["TTL", "k"]), Reply::Integer(20));
        assert_eq!(
            run(&c, &mut s, &["SET", "k", "v", "EX", "10", "PX", "5"]),
            syntax_error()
        );
        assert_eq!(
            run(&c, &mut s, &["SET", "k", "v", "XX", "NX"]),
            syntax_error()
        );
        // Options are all read before the time is.
        assert_eq!(
            run(&c, &mut s, &["SET", "k", "v", "EX", "0", "BAD"]),
            syntax_error()
        );
        assert_eq!(
            run(&c, &mut s, &["SET", "k", "v", "EX", "abc", "NX", "XX"]),
            syntax_error()
        );
        // A deadline past the signed 64-bit milliseconds is refused, and
        // the key keeps its value and TTL.
        for (opt, n) in [("PX", "9223372036854775807"), ("EX", "9223372036854775")] {
            assert_eq!(run(&c, &mut s, &["SET", "k", "w", opt, n]), invalid("set"));
        }
        assert_eq!(run(&c, &mut s, &["GET", "k"]), bulk("v"));
        for (cmd, n) in [
            ("EXPIRE", "-9223372036854775808"),
            ("EXPIRE", "9223372036854775807"),
            ("PEXPIRE", "9223372036854775807"),
        ] {
            let name = cmd.to_ascii_lowercase();
            assert_eq!(run(&c, &mut s, &[cmd, "k", n]), invalid(&name), "{cmd} {n}");
        }
        assert_eq!(run(&c, &mut s, &["TTL", "k"]), Reply::Integer(20));
        // TTL rounds to the nearest second.
        assert_eq!(
            run(&c, &mut s, &["PEXPIRE", "k", "1200"]),
            Reply::Integer(1)
        );
        assert_eq!(run(&c, &mut s, &["TTL", "k"]), Reply::Integer(1));
        assert_eq!(
            run(&c, &mut s, &["PEXPIRE", "k", "1500"]),
            Reply::Integer(1)
        );
        assert_eq!(run(&c, &mut s, &["TTL", "k"]), Reply::Integer(2));
        assert_eq!(run(&c, &mut s, &["PEXPIRE", "k", "400"]), Reply::Integer(1));
        assert_eq!(run(&c, &mut s, &["TTL", "k"]), Reply::Integer(0));
        // A negative time in range deletes.
        assert_eq!(
            run(&c, &mut s, &["PEXPIRE", "k", "-9223372036854775808"]),
            Reply::Integer(1)
        );
        assert_eq!(run(&c, &mut s, &["GET", "k"]), Reply::Null);
    }

    /// SET's GET, KEEPTTL, EXAT and PXAT (replies as redis-server 7.0.15
    /// gives them for the same commands).
    #[test]
    fn set_returns_the_old_value_keeps_ttls_and_takes_deadlines() {
        let (clock, c, mut s) = setup(); // the clock is at 1,000,000 ms
        assert_eq!(
            run(&c, &mut s, &["SET", "k", "v", "EX", "100"]),
            Reply::ok()
        );
        assert_eq!(run(&c, &mut s, &["SET", "k", "w", "KEEPTTL"]), Reply::ok());
        assert_eq!(run(&c, &mut s, &["TTL", "k"]), Reply::Integer(100));
        assert_eq!(run(&c, &mut s, &["SET", "k", "x", "GET"]), bulk("w"));
        assert_eq!(
            run(&c, &mut s, &["TTL", "k"]),
            Reply::Integer(-1),
            "a SET clears the TTL"
        );
        assert_eq!(run(&c, &mut s, &["SET", "n", "x", "GET"]), Reply::Null);
        // NX with GET: not written, the old value still returned.
        assert_eq!(run(&c, &mut s, &["SET", "k", "y", "NX", "GET"]), bulk("x"));
        assert_eq!(run(&c, &mut s, &["GET", "k"]), bulk("x"));
        assert_eq!(
            run(&c, &mut s, &["SET", "m", "v", "XX", "GET"]),
            Reply::Null
        );
        assert_eq!(run(&c, &mut s, &["GET", "m"]), Reply::Null);
        // Deadlines: seconds or milliseconds since the epoch.
        assert_eq!(
            run(&c, &mut s, &["SET", "e", "v", "EXAT", "1100"]),
            Reply::ok()
        );
        assert_eq!(run(&c, &mut s, &["TTL", "e"]), Reply::Integer(100));
        assert_eq!(
            run(&c, &mut s, &["SET", "e", "v", "PXAT", "1000500"]),
            Reply::ok()
        );
        assert_eq!(run(&c, &mut s, &["PTTL", "e"]), Reply::Integer(500));
        clock.advance(Duration::from_millis(500));
        assert_eq!(run(&c, &mut s, &["GET", "e"]), Reply::Null);
        // A deadline already past deletes the key.
        assert_eq!(
            run(&c, &mut s, &["SET", "k", "v", "PXAT", "1"]),
            Reply::ok()
        );
        assert_eq!(run(&c, &mut s, &["EXISTS", "k"]), Reply::Integer(0));
        assert_eq!(
            run(&c, &mut s, &["SET", "k", "v", "EXAT", "0"]),
            Reply::err("invalid expire time in 'set' command")
        );
        for mixed in [
            &["KEEPTTL", "EX", "10"][..],
            &["EX", "10", "EXAT", "100"],
            &["PXAT", "5", "KEEPTTL"],
        ] {
            let parts: Vec<&str> = ["SET", "k", "v"].iter().chain(mixed).copied().collect();
            assert_eq!(run(&c, &mut s, &parts), syntax_error(), "{mixed:?}");
        }
        assert_eq!(
            run(&c, &mut s, &["SET", "k", "v", "KEEPTTL", "KEEPTTL"]),
            Reply::ok()
        );
    }

    #[test]
    fn integers_are_read_as_redis_reads_them() {
        for (text, n) in [("0", Some(0)), ("-7", Some(-7)), ("42", Some(42))] {
            assert_eq!(parse_int(text.as_bytes()), n, "{text}");
        }
        assert_eq!(parse_int(b"-9223372036854775808"), Some(i64::MIN));
        for bad in [
            "+5",
            "05",
            "-0",
            "",
            "-",
            " 5",
            "5 ",
            "1e3",
            "9223372036854775808",
            "00",
        ] {
            assert_eq!(parse_int(bad.as_bytes()), None, "{bad:?}");
        }
        let (_, c, mut s) = setup();
        assert_eq!(
            run(&c, &mut s, &["SET", "k", "v", "EX", "+5"]),
            not_integer()
        );
        assert_eq!(run(&c, &mut s, &["SELECT", "0"]), Reply::ok());
        assert_eq!(run(&c, &mut s, &["SELECT", "00"]), not_integer());
        assert_eq!(
            run(&c, &mut s, &["SELECT", "1"]),
            Reply::err("DB index is out of range")
        );
    }

    /// EXPIRE's NX, XX, GT and LT (the same sequence gave the same replies
    /// from redis-server 7.0.15).
    #[test]
    fn expire_conditions_as_redis_7() {
        let (_, c, mut s) = setup();
        let steps: &[(&[&str], Reply)] = &[
            (&["SET", "k", "v"], Reply::ok()),
            (&["EXPIRE", "k", "100", "XX"], Reply::Integer(0)),
            (&["EXPIRE", "k", "100", "GT"], Reply::Integer(0)),
            (&["EXPIRE", "k", "100", "LT"], Reply::Integer(1)),
            (&["EXPIRE", "k", "50", "NX"], Reply::Integer(0)),
            (&["EXPIRE", "k", "300", "gt"], Reply::Integer(1)),
            (&["EXPIRE", "k", "100", "GT"], Reply::Integer(0)),
            (&["TTL", "k"], Reply::Integer(300)),
            (&["EXPIRE", "k", "120", "XX", "LT"], Reply::Integer(1)),
            (&["TTL", "k"], Reply::Integer(120)),
            (
                &["EXPIRE", "k", "10", "NX", "XX"],
                Reply::err("NX and XX, GT or LT options at the same time are not compatible"),
            ),
            (
                &["EXPIRE", "k", "10", "GT", "LT"],
                Reply::err("GT and LT options at the same time are not compatible"),
            ),
            (
                &["EXPIRE", "k", "abc", "Foo"],
                Reply::err("Unsupported option Foo"),
            ),
            (&["PEXPIRE", "k", "-5", "GT"], Reply::Integer(0)),
            (&["PEXPIRE", "k", "-5", "LT"], Reply::Integer(1)),
            (&["EXISTS", "k"], Reply::Integer(0)),
            (&["SET", "p", "v"], Reply::ok()),
            (&["EXPIRE", "p", "10", "LT", "XX"], Reply::Integer(0)),
            (&["EXPIRE", "p", "10", "LT"], Reply::Integer(1)),
        ];
        for (parts, reply) in steps {
            assert_eq!(run(&c, &mut s, parts), *reply, "{parts:?}");
        }
    }

    /// No passwords: the `default` user gets in with any, others do not.
    #[test]
    fn auth_as_redis_without_a_password() {
        let (_, c, mut s) = setup();
        assert!(matches!(
            run(&c, &mut s, &["AUTH", "secret"]),
            Reply::Error(e) if e.contains("without any password configured")
        ));
        assert_eq!(run(&c, &mut s, &["AUTH", "default", "secret"]), Reply::ok());
        let wrongpass =
            Reply::Error("WRONGPASS invalid username-password pair or user is disabled.".into());
        assert_eq!(run(&c, &mut s, &["AUTH", "bob", "secret"]), wrongpass);
        assert_eq!(
            run(&c, &mut s, &["HELLO", "3", "AUTH", "bob", "pw"]),
            wrongpass
        );
        assert_eq!(
            s.protocol,
            Protocol::Resp2,
            "a refused HELLO changes nothing"
        );
        assert_eq!(
            run(&c, &mut s, &["HELLO", "3", "AUTH", "default"]),
            Reply::err("Syntax error in HELLO option 'AUTH'")
        );
        assert_eq!(run(&c, &mut s, &["AUTH", "a", "b", "c"]), syntax_error());
        assert!(matches!(
            run(
                &c,
                &mut s,
                &["HELLO", "3", "AUTH", "default", "pw", "SETNAME", "w"]
            ),
            Reply::Map(_)
        ));
        assert_eq!(s.protocol, Protocol::Resp3);
        assert_eq!(s.name.as_deref(), Some(&b"w"[..]));
    }

    #[test]
    fn keys_and_multi() {
        let (_, c, mut s) = setup();
        assert_eq!(run(&c, &mut s, &["MSET", "a", "1", "b", "2"]), Reply::ok());
        assert_eq!(
            run(&c, &mut s, &["MGET", "a", "x", "b"]),
            Reply::Array(vec![Reply::text("1"), Reply::Null, Reply::text("2")])
        );
        assert_eq!(run(&c, &mut s, &["MSET", "a"]), wrong_args("MSET"));
        assert_eq!(
            run(&c, &mut s, &["EXISTS", "a", "b", "x"]),
            Reply::Integer(2)
        );
        assert_eq!(run(&c, &mut s, &["DBSIZE"]), Reply::Integer(2));
        assert_eq!(run(&c, &mut s, &["TTL", "a"]), Reply::Integer(-1));
        assert_eq!(run(&c, &mut s, &["EXPIRE", "a", "5"]), Reply::Integer(1));
        assert_eq!(run(&c, &mut s, &["EXPIRE", "x", "5"]), Reply::Integer(0));
        assert_eq!(run(&c, &mut s, &["PERSIST", "a"]), Reply::Integer(1));
        assert_eq!(run(&c, &mut s, &["TTL", "a"]), Reply::Integer(-1));
        assert_eq!(run(&c, &mut s, &["EXPIRE", "a", "-1"]), Reply::Integer(1));
        assert_eq!(run(&c, &mut s, &["TTL", "a"]), Reply::Integer(-2));
        assert_eq!(run(&c, &mut s, &["DEL", "a", "b"]), Reply::Integer(1));
        assert_eq!(run(&c, &mut s, &["DBSIZE"]), Reply::Integer(0));
    }

    #[test]
    fn agent_commands_and_md5_get() {
        let (clock, c, mut s) = setup();
        assert_eq!(
            run(
                &c,
                &mut s,
                &[
                    "AGENT.SET",
                    "a1",
                    "what?",
                    "this",
                    "EX",
                    "5",
                    "VARIANT",
                    "m1"
                ]
            ),
            Reply::ok()
        );
        assert_eq!(run(&c, &mut s, &["AGENT.GET", "a1", "what?"]), Reply::Null);
        assert_eq!(
            run(&c, &mut s, &["AGENT.GET", "a1", "what?", "m1"]),
            Reply::text("this")
        );
        let hex = crate::md5_hex(&crate::Request::new(b"a1", b"what?", b"m1").md5());
        assert_eq!(run(&c, &mut s, &["GET", &hex]), Reply::text("this"));
        assert_eq!(run(&c, &mut s, &["TTL", &hex]), Reply::Integer(5));
        assert_eq!(
            run(&c, &mut s, &["AGENT.SET", "a1", "p2", "x"]),
            Reply::ok()
        );
        assert_eq!(
            run(&c, &mut s, &["AGENT.DEL", "a1", "p2"]),
            Reply::Integer(1)
        );
        assert_eq!(
            run(&c, &mut s, &["AGENT.DEL", "a1", "p2"]),
            Reply::Integer(0)
        );
        assert_eq!(run(&c, &mut s, &["AGENT.FLUSH", "a1"]), Reply::Integer(1));
        assert_eq!(
            run(&c, &mut s, &["AGENT.SET", "a1", "p"]),
            wrong_args("AGENT.SET")
        );
        assert_eq!(
            run(&c, &mut s, &["AGENT.SET", "a1", "p", "r", "VARIANT"]),
            syntax_error()
        );
        clock.advance(Duration::from_secs(1));
        let info = info_text(&c, &mut s, &["INFO"]);
        assert!(info.contains("hits:2\r\n"), "{info}");
        assert!(info.contains("misses:1\r\n"), "{info}");
        assert!(info.contains("collisions:0\r\n"), "{info}");
    }

    fn info_text(c: &Cache, s: &mut Session, parts: &[&str]) -> String {
        match run(c, s, parts) {
            Reply::Verbatim(b) => String::from_utf8(b.to_vec()).unwrap(),
            other => panic!("{parts:?} replied {other:?}"),
        }
    }

    fn section_names(info: &str) -> Vec<&str> {
        info.split("\r\n")
            .filter_map(|l| l.strip_prefix("# "))
            .collect()
    }

    #[test]
    fn info_prints_the_sections_asked_for() {
        let (_, c, mut s) = setup();
        let all = info_text(&c, &mut s, &["INFO"]);
        assert_eq!(
            section_names(&all),
            ["Server", "Memory", "Stats", "Cache", "Keyspace"]
        );
        assert!(all.ends_with("expires=0\r\n"), "{all:?}");
        for every in ["default", "ALL", "everything"] {
            assert_eq!(info_text(&c, &mut s, &["INFO", every]), all, "{every}");
        }
        let cache = info_text(&c, &mut s, &["INFO", "cache"]);
        assert!(cache.starts_with("# Cache\r\nhits:0\r\n"), "{cache:?}");
        assert_eq!(section_names(&cache), ["Cache"]);
        // Several at once (redis 7), in the server's order, any case; a
        // name the server does not have adds nothing.
        let two = info_text(&c, &mut s, &["INFO", "KEYSPACE", "nosuch", "Server"]);
        assert_eq!(section_names(&two), ["Server", "Keyspace"]);
        assert!(two.contains("\r\n\r\n# Keyspace\r\ndb0:keys=0"), "{two:?}");
        assert_eq!(info_text(&c, &mut s, &["INFO", "nosuch"]), "");
        // A memory-only cache has no persistence section to select.
        assert_eq!(info_text(&c, &mut s, &["INFO", "persistence"]), "");
    }

    #[test]
    fn session_commands() {
        let (_, c, mut s) = setup();
        assert_eq!(run(&c, &mut s, &["PING"]), Reply::Simple("PONG".into()));
        assert_eq!(run(&c, &mut s, &["PING", "hi"]), Reply::text("hi"));
        assert_eq!(run(&c, &mut s, &["CLIENT", "GETNAME"]), Reply::Null);
        assert_eq!(
            run(&c, &mut s, &["CLIENT", "SETNAME", "worker"]),
            Reply::ok()
        );
        assert_eq!(
            run(&c, &mut s, &["CLIENT", "GETNAME"]),
            Reply::text("worker")
        );
        let Reply::Map(m) = run(&c, &mut s, &["HELLO", "3", "SETNAME", "w2"]) else {
            panic!("HELLO must reply with a map");
        };
        assert!(m.contains(&(Reply::text("proto"), Reply::Integer(3))));
        assert_eq!(s.protocol, Protocol::Resp3);
        assert_eq!(s.name.as_deref(), Some(&b"w2"[..]));
        // A name is a label the session keeps: a long one is refused, and
        // a refused HELLO changes nothing (neither name nor protocol).
        let long = "n".repeat(MAX_CLIENT_NAME + 1);
        let refused = Reply::err(format!(
            "Client names are limited to {MAX_CLIENT_NAME} bytes"
        ));
        assert_eq!(run(&c, &mut s, &["CLIENT", "SETNAME", &long]), refused);
        assert_eq!(run(&c, &mut s, &["HELLO", "2", "SETNAME", &long]), refused);
        for bad in ["a b", "a\tb", "a\rb", "caf\u{e9}", "\u{7f}"] {
            assert_eq!(
                run(&c, &mut s, &["HELLO", "2", "SETNAME", bad]),
                Reply::err("Client names cannot contain spaces, newlines or special characters."),
                "{bad:?}"
            );
        }
        assert_eq!(s.protocol, Protocol::Resp3);
        assert_eq!(s.name.as_deref(), Some(&b"w2"[..]));
        let fits = "n".repeat(MAX_CLIENT_NAME);
        assert_eq!(run(&c, &mut s, &["CLIENT", "SETNAME", &fits]), Reply::ok());
        assert_eq!(
            run(&c, &mut s, &["HELLO", "4"]),
            Reply::Error("NOPROTO unsupported protocol version".into())
        );
        assert!(execute(&c, &mut s, cmd(&["QUIT"])).close);
    }

    #[test]
    fn mget_reply_is_capped() {
        let (_, c, mut s) = setup();
        // Nine 8 MiB values (one shared allocation) exceed the 64 MiB cap.
        let big = Bytes::from(vec![b'v'; 8 << 20]);
        let keys: Vec<String> = (0..9).map(|i| format!("k{i}")).collect();
        for k in &keys {
            c.set_plain(k.as_bytes(), big.clone(), None, SetCondition::Always)
                .unwrap();
        }
        let mut cmd_parts = vec!["MGET"];
        cmd_parts.extend(keys.iter().map(String::as_str));
        let Reply::Error(e) = run(&c, &mut s, &cmd_parts) else {
            panic!("expected an error");
        };
        assert!(e.contains("MGET reply would exceed"), "{e}");
        let Reply::Array(v) = run(&c, &mut s, &cmd_parts[..9]) else {
            panic!("expected an array");
        };
        assert_eq!(v.len(), 8);
    }

    #[test]
    fn stored_values_do_not_pin_the_read_buffer() {
        let (_, c, mut s) = setup();
        let buffer = Bytes::from(b"SETkv".repeat(1000));
        let frame = Frame::Array(vec![
            Frame::Bulk(buffer.slice(0..3)),
            Frame::Bulk(buffer.slice(3..4)),
            Frame::Bulk(buffer.slice(4..5)),
        ]);
        assert_eq!(execute(&c, &mut s, frame).reply, Reply::ok());
        let stored = c.get_plain(b"k").unwrap();
        assert_eq!(stored, Bytes::from("v"));
        let range = buffer.as_ptr() as usize..buffer.as_ptr() as usize + buffer.len();
        assert!(!range.contains(&(stored.as_ptr() as usize)));
    }

    #[test]
    fn echoed_arguments_and_names_do_not_pin_the_read_buffer() {
        let (_, c, mut s) = setup();
        // Arguments as the decoder hands them over: slices of one buffer.
        let buffer = Bytes::from([&b"ECHOCLIENTSETNAMEHELLO2w"[..], &[b'x'; 8192]].concat());
        let arg = |r: std::ops::Range<usize>| Frame::Bulk(buffer.slice(r));
        let inside = |b: &Bytes| {
            let start = buffer.as_ptr() as usize;
            (start..start + buffer.len()).contains(&(b.as_ptr() as usize))
        };
        let echoed = execute(&c, &mut s, Frame::Array(vec![arg(0..4), arg(24..8216)])).reply;
        let Reply::Bulk(b) = echoed else {
            panic!("ECHO replied {echoed:?}");
        };
        assert_eq!(b.len(), 8192);
        assert!(
            !inside(&b),
            "the echoed argument is a slice of the read buffer"
        );
        let named = Frame::Array(vec![arg(4..10), arg(10..17), arg(24..1024)]);
        assert_eq!(execute(&c, &mut s, named).reply, Reply::ok());
        assert!(!inside(s.name.as_ref().unwrap()));
        let hello = Frame::Array(vec![arg(17..22), arg(22..23), arg(10..17), arg(23..24)]);
        assert!(matches!(execute(&c, &mut s, hello).reply, Reply::Map(_)));
        assert_eq!(s.name.as_deref(), Some(&b"w"[..]));
        assert!(!inside(s.name.as_ref().unwrap()));
    }

    #[test]
    fn bad_commands_get_errors() {
        let (_, c, mut s) = setup();
        assert_eq!(
            run(&c, &mut s, &["FLUSHALL"]),
            Reply::err("unknown command 'FLUSHALL', with args beginning with: ''")
        );
        assert_eq!(
            execute(&c, &mut s, Frame::Integer(3)).reply,
            Reply::err("Protocol error: expected an array of bulk strings")
        );
        assert_eq!(
            execute(&c, &mut s, Frame::Array(vec![Frame::Integer(1)])).reply,
            Reply::err("Protocol error: command arguments must be bulk strings")
        );
        assert_eq!(
            execute(&c, &mut s, Frame::Array(vec![])).reply,
            Reply::err("empty command")
        );
        let small = Cache::new(CacheConfig {
            max_value_bytes: 4,
            ..CacheConfig::default()
        });
        let r = run(&small, &mut s, &["SET", "k", "12345"]);
        assert_eq!(
            r,
            Reply::err(
                "cache put refused: value of 5 bytes exceeds the maximum value size of 4 bytes"
            )
        );
        assert_eq!(
            run(&small, &mut s, &["MSET", "a", "1", "b", "12345"]),
            Reply::err("value of 5 bytes exceeds the maximum value size of 4 bytes")
        );
        assert_eq!(run(&small, &mut s, &["DBSIZE"]), Reply::Integer(0));
    }
}
